"""Write and read compressed checkpoints (the layout is the public contract in docs/FORMAT.md).

Every write goes to a temporary directory beside the destination, renamed into place only when complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from compress.errors import CompressError, NumericError
from compress.formats.base import QuantizedLinear
from compress.formats.embedding import QuantizedEmbedding, shared_embeddings
from compress.hf import (
    PLACEHOLDER_VERSION,
    QUANT_METHOD,
    CompressConfig,
    needed_version,
    placeholder,
    placeholder_names,
)
from compress.integrity import WEIGHTS_FILE
from compress.ownership import check_replaceable, fresh_path, remove_checkpoint
from compress.prune.structure import structure_record

log = logging.getLogger(__name__)

FLOAT16_MAX = torch.finfo(torch.float16).max
ROUNDING_CHUNK = 1 << 22  # elements rounded at once


def check_destination(out: str | Path, force: bool, sources: tuple[Path, ...] = ()) -> Path:
    """Refuse early (before any heavy work) an output that is an input (`sources`), the working directory, or an
    existing path (unless `force`, and then only a checkpoint compress wrote that holds nothing else)."""
    out = Path(out)
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise CompressError(f"output {str(out)!r} is the working directory or one above it; name a new directory")
    if (out.exists() or out.is_symlink()) and not force:
        raise CompressError(f"output {str(out)!r} already exists; pass --force to replace it")
    check_replaceable(out, list(sources))
    check_creatable(out, sum(_weights_bytes(source) for source in sources))
    return out


NAME_MARGIN = 40  # characters the temporary names beside the output add to its name (`.<name>.partial-...`)


def check_creatable(out: Path, needed_bytes: int) -> None:
    """Refuse, before any work, an output that cannot be written: a name too long for the file system, a parent
    that is a file or not writable, or (roughly) too little free space for `needed_bytes`."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CompressError(f"output {str(out)!r}: {str(ancestor)!r} is a file, so nothing can be created under it")
    limit = os.pathconf(ancestor, "PC_NAME_MAX")
    for part in out.relative_to(ancestor).parts:
        if len(part.encode()) + NAME_MARGIN > limit:
            raise CompressError(f"output {str(out)!r}: the name {part[:60]!r}... is {len(part.encode())} bytes; the "
                                f"file system allows {limit}, and compress needs {NAME_MARGIN} more for its "
                                "temporary names")  # fmt: skip
    probe = fresh_path(ancestor, ".compress-probe-")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        message = f"output {str(out)!r}: cannot create anything in {str(ancestor)!r} ({error.strerror})"
        raise CompressError(message) from error
    free = shutil.disk_usage(ancestor).free
    if needed_bytes and free < needed_bytes:
        raise CompressError(f"output {str(out)!r}: {free / 2**20:.0f} MiB free in {str(ancestor)!r}, and the run needs "
                            f"about {needed_bytes / 2**20:.0f} MiB (the output and its run state)")  # fmt: skip


def _weights_bytes(source: Path) -> int:
    """Twice the size of the weight files at `source` (the output and the run state beside it, roughly)."""
    files = [source] if source.is_file() else [*source.glob("*.safetensors"), *source.glob("*.gguf")]
    return 2 * sum(path.stat().st_size for path in files if path.is_file())


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a new temporary directory beside `out`; on success it replaces `out` (whose own files are deleted,
    after checking once more that it holds nothing else), on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = fresh_path(out.parent, f".{out.name}.partial-")
    temporary.mkdir()
    try:
        yield temporary
        check_replaceable(out, [])
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    previous = fresh_path(out.parent, f".{out.name}.previous-")
    if out.exists():
        out.rename(previous)
    temporary.rename(out)
    if previous.exists():
        remove_checkpoint(previous)


def round_to_storage(model: nn.Module) -> None:
    """Round every stored floating tensor to float16 in place, so the model computes exactly what its export will
    (tensors on the meta device, of blocks a streamed run already wrote, are skipped)."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and not tensor.is_meta:
            data = tensor.data
            if data.numel() and max(float(data.max()), -float(data.min())) > FLOAT16_MAX:  # (no full-size |data|)
                raise NumericError(f"tensor {name} has values beyond the float16 range and cannot be exported")
            if not data.is_contiguous():
                data.copy_(data.to(torch.float16).to(data.dtype))
                continue
            for chunk in data.view(-1).split(ROUNDING_CHUNK):  # in place, a chunk at a time: no full-size copy
                chunk.copy_(chunk.to(torch.float16).to(data.dtype))


def layer_settings(model: nn.Module) -> dict[str, dict]:
    return {
        name: {
            "format": module.format,
            "in_features": module.in_features,
            "out_features": module.out_features,
            **module.settings(),
        }
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLinear)
    }


def packed_state_dict(model: nn.Module, exclude: str | None = None) -> dict[str, torch.Tensor]:
    """Every persistent tensor once (tied weights are written under their first name), floats as float16, and the
    empty `NAME.weight` placeholder of each compressed layer; names starting with `exclude` are left out."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if (exclude and name.startswith(exclude)) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        tensors[name] = tensor.detach().contiguous().cpu()
    for name in placeholder_names(model):
        if not (exclude and name.startswith(exclude)):
            tensors[name] = placeholder()
    return tensors


def dense_state_dict(model: nn.Module, config) -> dict[str, torch.Tensor]:
    """Plain float16 weights: every compressed layer dequantized, in the layout the stock architecture expects."""
    from transformers import AutoModel

    with torch.device("meta"):
        skeleton = AutoModel.from_config(config) if not _is_causal(config) else _causal_from_config(config)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    compressed = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in compressed or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = (tensor.to(torch.float16) if tensor.is_floating_point() else tensor).contiguous()
    for name, module in compressed.items():
        weight = module.dequantize().detach()
        if type(skeleton.get_submodule(name)).__name__ == "Conv1D":
            weight = weight.t()
        tensors[f"{name}.weight"] = weight.to(torch.float16).contiguous()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().to(torch.float16).contiguous()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedEmbedding):  # its rows, as a plain embedding (the config no longer ties it)
            tensors[f"{name}.weight"] = module.head.dequantize().detach().to(torch.float16).contiguous()
    return tensors


def _is_causal(config) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))


def _causal_from_config(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    directory: Path,
    *,
    export_format: str,
    recipe_yaml: str,
) -> None:
    """Write weights, config and tokenizer into `directory` (a temporary directory from `atomic_directory`)."""
    packed = export_format == "packed"
    config, metadata = checkpoint_config(model, packed)
    tensors = packed_state_dict(model) if packed else dense_state_dict(model, model.config)
    save_safetensors(tensors, directory / WEIGHTS_FILE, metadata)
    write_side_files(model, config, tokenizer, directory, recipe_yaml)


def checkpoint_config(model: nn.Module, packed: bool) -> tuple[dict, dict[str, str]]:
    """The config.json of a checkpoint of `model` and the safetensors metadata of its weight files."""
    config = model.config
    config.architectures = [type(model).__name__]
    structure = structure_record(model)  # a pruned model whose blocks differ in size
    layers = layer_settings(model) if packed else {}
    embeddings = shared_embeddings(model) if packed else {}
    version = needed_version(layers, structure, embeddings)
    saved = config.to_dict()
    saved.pop("quantization_config", None)
    saved["dtype"] = "float16"  # what every floating tensor is stored as (compress.load computes in float32)
    metadata = {"format": "pt"}
    if layers or structure is not None:  # else a stock checkpoint: nothing compressed, blocks as the config says
        if structure is not None and not packed:
            log.warning("the blocks of the model differ in size: the dense checkpoint records them and needs compress")
        saved["quantization_config"] = CompressConfig(version, layers, structure, embeddings).to_dict()
        metadata.update(quant_method=QUANT_METHOD, format_version=str(version))
    return saved, metadata


def write_side_files(model: nn.Module, config: dict, tokenizer, directory: Path, recipe_yaml: str) -> None:
    """config.json, the generation config, the tokenizer and the recipe."""
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and _is_causal(model.config):
        generation.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "recipe.yaml").write_text(recipe_yaml)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`safetensors.save_file`, then the `__metadata__` keys put in sorted order: the library writes them in a
    random order, and the same model must give the same bytes. The header keeps its length and padding."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())  # the library writes mode 0600; a server may run as another user
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        text = handle.read(length).decode("utf-8")
        header = json.loads(text)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(canonical) > length:  # never expected: the same keys and values in another order
            raise RuntimeError("safetensors header grew when its metadata was sorted")
        handle.seek(8)
        handle.write(canonical.ljust(length, b" "))


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load(
    path: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, verify: bool = True
) -> nn.Module:
    """Load a checkpoint written by `compress` (packed or dense) as a transformers model.

    With `verify` (the default) every file must match the size and sha256 recorded in its report.json. Always,
    the safetensors header is checked against the tensors the config implies (names, shapes, dtypes) before any
    tensor is allocated."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = Path(path)
    config = check_checkpoint(path, verify=verify, trust_remote_code=trust_remote_code)
    model_class = AutoModelForCausalLM if _is_causal(config) else AutoModel
    try:
        model, info = model_class.from_pretrained(
            path, dtype=dtype, output_loading_info=True, trust_remote_code=trust_remote_code
        )
    except CompressError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CompressError(f"checkpoint {str(path)!r} could not be loaded: {error}") from error
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise CompressError(f"checkpoint {str(path)!r} does not match its config: {problems}")
    model.eval()
    return model


def check_checkpoint(path: Path, *, verify: bool = True, trust_remote_code: bool = False):
    """Everything `load` checks before reading tensors; returns the config."""
    from compress.hf import install_from_config
    from compress.integrity import expected_tensors, stored_tensors, tensor_problems, verify_files
    from compress.models import read_config, skeleton

    where = f"checkpoint {str(path)!r}"
    if not (path / "config.json").is_file():
        raise CompressError(f"{where}: no config.json, so it is not a checkpoint directory")
    if verify:
        verify_files(path)
    stored = stored_tensors(path)
    config = read_config(path, where, trust_remote_code=trust_remote_code)
    model = skeleton(config, "causal-lm" if _is_causal(config) else "encoder", trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not install_from_config(model, config, where):
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        raise CompressError(f"{where}: quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}")
    expected, tied = expected_tensors(model)
    settings = quantization if isinstance(quantization, dict) else getattr(quantization, "__dict__", {})
    if settings.get("format_version", 0) >= PLACEHOLDER_VERSION:  # a readable version (install_from_config)
        expected.update({name: ("U8", (0,)) for name in placeholder_names(model)})
    problems = tensor_problems(stored, expected, tied)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CompressError(f"{where}: the weights do not match config.json: {shown}")
    return config
