"""Calibration text sampled from the original model (`data.calibration.source: generated`).

The model itself is the one source of in-distribution text that is always at hand: sequences it samples
(temperature and nucleus sampling from a random vocabulary token or the beginning-of-text token, as in the
data-free distillation of LLM-QAT) follow what it was trained on, not one narrow corpus. Sampling runs through
`transformers`' `generate` with its KV cache, in batches, before any stage changes the model; the sequences are
cached on disk keyed by the model's weights, the settings and the seed, so `--resume`, and every other run on the
same model beside it, reuses them instead of sampling again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import CompressError
from compress.ownership import fresh_path, make_owned
from compress.recipe import Generation

log = logging.getLogger(__name__)

CACHE_KIND = "generated calibration"
CACHE_NAME = ".compress-generated"  # beside the output: shared by the runs that write next to each other


def cache_directory(out: Path) -> Path:
    return out.parent / CACHE_NAME


def first_tokens(tokenizer, vocab_size: int, count: int, rule: str, generator: torch.Generator) -> torch.Tensor:
    """The `[count, 1]` tokens the sequences start from: uniform over the ordinary tokens, or `bos`."""
    if rule == "bos":
        if tokenizer.bos_token_id is None:
            raise CompressError("data.calibration.generation.first_token: bos, but the tokenizer has no "
                                "beginning-of-text token; use first_token: random")  # fmt: skip
        return torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.int64)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), vocab_size)) if i not in special])
    return ordinary[torch.randint(len(ordinary), (count, 1), generator=generator)]


def sample(model: nn.Module, tokenizer, count: int, seq_len: int, spec: Generation, seed: int) -> torch.Tensor:
    """`count` sequences `[count, seq_len]` sampled from `model`; the same for the same seed and settings. The
    global random state of the run is left as it was."""
    from transformers import GenerationConfig

    if not getattr(model, "can_generate", lambda: False)():
        raise CompressError(f"data.calibration.source: generated needs a model that generates text; "
                            f"{type(model).__name__} does not")  # fmt: skip
    device = next(model.parameters()).device
    vocab_size = model.get_output_embeddings().out_features
    starts = first_tokens(tokenizer, vocab_size, count, spec.first_token, torch.Generator().manual_seed(seed))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new = seq_len - 1
    # every sequence runs to seq_len: the end-of-text token is suppressed rather than ending a row early
    config = GenerationConfig(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                              max_new_tokens=new, min_new_tokens=new, use_cache=True, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    devices = [device.index or 0] if device.type == "cuda" else []
    sequences, started = [], time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for number, batch in enumerate(starts.split(spec.batch_size)):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 1_000_003 + number)  # each batch its own stream: resumable, reproducible
                batch = batch.to(device)
                out = model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=config)
            sequences.append(out[:, :seq_len].cpu())
            done = sum(len(s) for s in sequences)
            rate = done * seq_len / (time.perf_counter() - started)
            log.info("generated %d/%d calibration sequences of %d tokens (%.0f tokens/s)", done, count, seq_len, rate)
    finally:
        model.train(was_training)
    result = torch.cat(sequences)
    if result.shape != (count, seq_len):
        raise CompressError(f"generation gave {tuple(result.shape)} tokens, not {(count, seq_len)}")
    return result


def weights_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer (names, shapes, dtypes and values): the model's identity."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_key(model: nn.Module, tokenizer, count: int, seq_len: int, spec: Generation, seed: int) -> str:
    settings = f"{spec.model_dump_json()}|{count}|{seq_len}|{seed}|{len(tokenizer)}|{tokenizer.bos_token_id}"
    return hashlib.sha256(f"{weights_digest(model)}|{settings}".encode()).hexdigest()[:32]


def generated_windows(
    model: nn.Module, tokenizer, count: int, seq_len: int, spec: Generation, seed: int, cache: Path | None
) -> tuple[torch.Tensor, dict]:
    """The sampled windows, from the cache under `cache` when a run with the same model, settings and seed made
    them, else sampled and stored there; and what to report about them."""
    key = cache_key(model, tokenizer, count, seq_len, spec, seed)
    path = cache / f"{key}.safetensors" if cache is not None else None
    info = {"source": "generated", "windows": count, "key": key, **spec.model_dump()}
    if path is not None and path.is_file():
        try:
            windows = load_file(path)["tokens"]
        except (OSError, SafetensorError, KeyError) as error:
            log.warning("generated calibration cache %s is unreadable (%s); sampling again", path, error)
        else:
            if windows.shape == (count, seq_len) and windows.dtype == torch.int64:
                log.info("generated calibration: %d sequences reused from %s", count, path)
                return windows, {**info, "cached": True, "seconds": 0.0}
            log.warning("generated calibration cache %s holds %s tokens; sampling again", path, tuple(windows.shape))
    started = time.perf_counter()
    windows = sample(model, tokenizer, count, seq_len, spec, seed)
    seconds = time.perf_counter() - started
    if path is not None:
        make_owned(cache, CACHE_KIND)
        partial = fresh_path(cache, f".{key}.partial")
        save_file({"tokens": windows.contiguous()}, str(partial), metadata={"seq_len": str(seq_len)})
        os.replace(partial, path)  # never a half-written file under the final name
    return windows, {**info, "cached": False, "seconds": seconds}
