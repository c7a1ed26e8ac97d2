"""Quality, size and speed of a model: perplexity, KL to the original, embedding similarity, bits per weight,
bytes on disk, forward tokens per second."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.formats.base import QuantizedLinear


class ReferenceCache:
    """The original model's next-token log-probabilities (float16) on the evaluation windows, kept on disk
    (a memory-mapped file) so the original model need not stay in memory for the KL measurement."""

    def __init__(self, num_windows: int, positions: int, vocab_size: int) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="compress-reference-")
        path = Path(self._directory.name) / "logprobs.f16"
        self.logprobs = np.memmap(path, dtype=np.float16, mode="w+", shape=(num_windows, positions, vocab_size))

    def close(self) -> None:
        del self.logprobs
        self._directory.cleanup()


@dataclass
class LanguageModelQuality:
    perplexity: float
    kl_to_original: float | None
    tokens: int
    window_nll: list[float] = field(default_factory=list)  # each window's mean next-token loss

    @property
    def log_perplexity_se(self) -> float | None:
        """The standard error of the mean token loss (the log-perplexity) over the windows, each window one
        sample (its tokens are not independent): the spread a perplexity is known to, as a fraction of it."""
        if len(self.window_nll) < 2:
            return None
        return float(np.std(self.window_nll, ddof=1) / math.sqrt(len(self.window_nll)))


@torch.no_grad()
def language_model_quality(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    reference: ReferenceCache | None = None,
    record: bool = False,
    desc: str = "eval",
) -> LanguageModelQuality:
    """Perplexity of next-token prediction over every position of every window; with `reference`, also the mean
    KL(original || model) per token. With `record`, the model's log-probs are written into `reference` instead."""
    total_nll = 0.0
    total_kl = 0.0
    count = 0
    per_window: list[float] = []
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(len(batch)):  # one window at a time: [positions, vocab] tensors stay small
            logprobs = F.log_softmax(logits[row, :-1].float(), dim=-1)
            targets = batch[row, 1:]
            window_nll = float(-logprobs.gather(-1, targets.unsqueeze(-1)).sum())
            total_nll += window_nll
            count += targets.numel()
            per_window.append(window_nll / targets.numel())
            if reference is None:
                continue
            if record:
                reference.logprobs[start + row] = logprobs.half().numpy()
            else:
                original = torch.from_numpy(np.asarray(reference.logprobs[start + row])).float()
                total_kl += float(F.kl_div(logprobs, original, log_target=True, reduction="sum"))
        del logits
    kl = total_kl / count if reference is not None and not record else None
    return LanguageModelQuality(math.exp(total_nll / count), kl, count, per_window)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states `[num_windows, hidden]` (sentence-transformers pooling)."""
    pooled = []
    for batch in windows.split(batch_size):
        hidden = model(input_ids=batch).last_hidden_state.float()
        pooled.append(F.normalize(hidden.mean(dim=1), dim=-1))
    return torch.cat(pooled)


def quantized_bits(model: nn.Module) -> tuple[float, int]:
    """Effective bits per weight over every compressed layer (all stored tensors counted) and their weight count."""
    bits = 0.0
    weights = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            count = module.in_features * module.out_features
            bits += module.bits_per_weight() * count
            weights += count
    return (bits / weights if weights else 0.0), weights


def directory_size(path: str | Path) -> int:
    """Every file of a checkpoint directory (tokenizer, config and reports included)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weights_size(path: str | Path) -> int:
    """The size of a checkpoint as every report gives it: its weight files (`model.safetensors` or the shards),
    headers included; the tokenizer, config and reports are not counted."""
    from compress.integrity import weight_files

    return sum(f.stat().st_size for f in weight_files(Path(path)))


def float16_weights_size(model: nn.Module) -> int:
    """What the same measure gives for `model` written as float16 safetensors (every unique tensor, 2 bytes per
    floating element, integer tensors as they are; headers aside): the original's side of every comparison."""
    from compress.models import unique_tensors

    state = model.state_dict()
    return sum(state[name].numel() * (2 if state[name].is_floating_point() else state[name].element_size())
               for name in unique_tensors(model))  # fmt: skip


@torch.no_grad()
def tokens_per_second(model: nn.Module, windows: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    """Forward-pass throughput on one batch of evaluation windows (best of `repeats`, after one warm-up)."""
    batch = windows[:batch_size]
    model(input_ids=batch)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=batch)
        best = min(best, time.perf_counter() - start)
    return batch.numel() / best


@torch.no_grad()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32) -> tuple[float, torch.Tensor]:
    """Batch-1 greedy decoding, as a deployment runs it: `prompt [1, n]`, then exactly `new_tokens` tokens through
    the KV cache. Returns the new tokens per second (after a short warm-up) and the generated ids `[1, n + new]`."""
    settings = {"do_sample": False, "pad_token_id": 0}
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **settings)
    start = time.perf_counter()
    ids = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    return (ids.shape[1] - prompt.shape[1]) / (time.perf_counter() - start), ids


@torch.no_grad()
def greedy_text(model: nn.Module, tokenizer, prompt: str, new_tokens: int) -> str:
    """The greedy continuation of `prompt` (the new text only), for a side-by-side look at two models."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        return ""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad if pad is not None else 0)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def prefill_speed(model: nn.Module, ids: torch.Tensor, repeats: int = 2) -> float:
    """Tokens per second of one batch-1 forward over `ids [1, n]` (a prompt being read), best of `repeats`."""
    model(input_ids=ids[:, :8])
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        best = min(best, time.perf_counter() - start)
    return ids.shape[1] / best


@torch.no_grad()
def masked_sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Embeddings of whole sentences as sentence-transformers makes them: each sentence tokenized with its special
    tokens, batches padded, the last hidden states mean-pooled over real tokens only, then L2-normalised
    `[len(sentences), hidden]`. Compare two models by the mean of the row-wise dot products (cosine)."""
    pooled = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1).float())
    return torch.cat(pooled)
