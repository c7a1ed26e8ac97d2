"""transformers integration: `from_pretrained` of a compress checkpoint rebuilds our modules, then loads the
packed tensors into them. Registered when `compress` is imported."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from compress.errors import CompressError
from compress.models import dense_weight, is_linear, replace_module
from compress.prune.structure import apply_structure
from compress.registry import FORMATS

QUANT_METHOD = "compress"
# 2 added `structure` (per-block sizes of a pruned model), 3 kept columns of `codebook` layers, 4 the empty
# `NAME.weight` placeholder of every compressed layer (stock transformers refuses it instead of loading at random),
# 5 `embeddings`: an input embedding that reads the rows of the compressed head it was tied to
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
PLACEHOLDER_VERSION = 4
EMBEDDINGS_VERSION = 5


def needed_version(layers: dict[str, dict[str, Any]], structure: Any, embeddings: dict[str, str] | None = None) -> int:
    """The format version of a checkpoint with these compressed layers, structure and shared embeddings: 5 with an
    embedding read from a compressed head, else 4 with compressed layers (their placeholders), else 2 for a pruned
    dense checkpoint whose blocks differ, else 1."""
    if embeddings:
        return EMBEDDINGS_VERSION
    if layers:
        return PLACEHOLDER_VERSION
    return 2 if structure is not None else 1


def placeholder() -> torch.Tensor:
    """The tensor stored as `NAME.weight` of a compressed layer `NAME` (version 4): empty, so that transformers
    without `import compress` refuses the checkpoint for its shape instead of initialising the layer at random."""
    return torch.empty(0, dtype=torch.uint8)


def placeholder_names(model: nn.Module) -> list[str]:
    """The placeholder tensor names of `model`'s compressed layers."""
    from compress.formats.base import QuantizedLinear

    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]


@register_quantization_config(QUANT_METHOD)
class CompressConfig(QuantizationConfigMixin):
    """The `quantization_config` block of config.json: format version, every compressed layer's format, the
    per-block sizes of a pruned model whose blocks differ (`structure`, version 2), and the embeddings read from a
    compressed head (`embeddings`, version 5)."""

    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        layers: dict[str, dict[str, Any]] | None = None,
        structure: dict[str, dict[str, int]] | None = None,
        embeddings: dict[str, str] | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = layers or {}
        if structure is not None:
            self.structure = structure
        if embeddings:
            self.embeddings = embeddings


@register_quantizer(QUANT_METHOD)
class CompressQuantizer(HfQuantizer):
    requires_calibration = True

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        config = self.quantization_config
        structure, embeddings = getattr(config, "structure", None), getattr(config, "embeddings", None)
        install_compressed(model, config.format_version, config.layers, structure, "checkpoint", embeddings)
        # the placeholders (version 4) are for stock transformers only: ours have no dense weight to fill
        ignored = {re.escape(name) + "$" for name in placeholder_names(model)}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignored

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> None:
        from compress.runtime import prepare

        prepare(model)

    def is_serializable(self, **kwargs) -> bool:
        return True  # save_pretrained writes the packed format (get_state_dict_and_metadata)

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What `save_pretrained` writes: the tensors and header metadata of `compress.export`'s packed format."""
        from compress.export import packed_state_dict

        config = self.quantization_config
        version = needed_version(config.layers, getattr(config, "structure", None), getattr(config, "embeddings", None))
        self.quantization_config.format_version = version
        return packed_state_dict(model), {"quant_method": QUANT_METHOD, "format_version": str(version)}

    @property
    def is_trainable(self) -> bool:
        return True


def attach_quantizer(model: nn.Module) -> None:
    """Give a model compressed in memory what a loaded checkpoint has: its `quantization_config` and our quantizer,
    so that `save_pretrained` writes the packed format and `from_pretrained` (after `import compress`) reads it."""
    from compress.export import layer_settings
    from compress.formats.embedding import shared_embeddings
    from compress.prune.structure import structure_record

    layers = layer_settings(model)
    if not layers:
        return
    structure, embeddings = structure_record(model), shared_embeddings(model)
    config = CompressConfig(needed_version(layers, structure, embeddings), layers, structure, embeddings)
    model.config.quantization_config = config
    model.hf_quantizer = CompressQuantizer(config)


def install_compressed(
    model: nn.Module,
    format_version: int,
    layers: dict[str, dict[str, Any]],
    structure: Any,
    where: str,
    embeddings: Any = None,
) -> None:
    """Resize the blocks to a pruned checkpoint's `structure` (if any), swap each listed linear for an empty module
    of its format, so the checkpoint's tensors load into them, and each listed embedding for one reading the rows
    of its compressed head."""
    if format_version not in READABLE_VERSIONS:
        raise CompressError(
            f"{where}: format version {format_version!r} is not supported by this compress (it reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if structure is not None:
        if format_version < 2:
            raise CompressError(f"{where}: quantization_config.structure needs format version 2, not {format_version}")
        apply_structure(model, structure, where)
    if format_version < 3 and isinstance(layers, dict):
        kept = [
            name for name, settings in layers.items() if isinstance(settings, dict) and settings.get("kept_columns")
        ]
        if kept:
            raise CompressError(f"{where}: layer {kept[0]!r} has kept_columns, which needs format version 3, "
                                f"not {format_version}")  # fmt: skip
    if embeddings is not None and format_version < EMBEDDINGS_VERSION:
        raise CompressError(f"{where}: quantization_config.embeddings needs format version {EMBEDDINGS_VERSION}, "
                            f"not {format_version}")  # fmt: skip
    install_empty_modules(model, layers)
    if embeddings is not None:
        from compress.formats.embedding import install_shared_embeddings

        install_shared_embeddings(model, embeddings, where)


def install_empty_modules(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Swap each listed linear for an empty module of its format, so the checkpoint's tensors load into it."""
    for name, settings in layers.items():
        if not isinstance(settings, dict):
            raise CompressError(f"checkpoint layer {name!r}: its settings must be a mapping, got {settings!r}")
        try:
            original = model.get_submodule(name)
        except AttributeError as error:
            raise CompressError(f"checkpoint config names layer {name!r}, which the model does not have") from error
        if not is_linear(original):
            raise CompressError(f"checkpoint config names layer {name!r}, which is not a linear layer of the model")
        format_name = settings.get("format")
        if not isinstance(format_name, str) or format_name not in FORMATS:
            raise CompressError(
                f"checkpoint layer {name!r} has unknown format {format_name!r}; known: {sorted(FORMATS)}"
            )
        out_features, in_features = dense_weight(original).shape
        expected = (settings.get("out_features", out_features), settings.get("in_features", in_features))
        if expected != (out_features, in_features):
            raise CompressError(
                f"checkpoint layer {name!r} is recorded as {expected[0]}x{expected[1]} but the model's config makes it "
                f"{out_features}x{in_features}"
            )
        has_bias = getattr(original, "bias", None) is not None
        try:
            module = FORMATS[format_name].empty(in_features, out_features, has_bias, settings)
        except (ValueError, TypeError, KeyError, ZeroDivisionError) as error:
            raise CompressError(
                f"checkpoint layer {name!r} has invalid {format_name} settings {settings}: {error}"
            ) from error
        replace_module(model, name, module.to(original.weight.device))


def install_from_config(model: nn.Module, config, where: str) -> bool:
    """On a meta skeleton built from `config`: install the compressed layers its `quantization_config` lists.
    Returns False when the config has no quantization of ours; `where` names the checkpoint in errors."""
    from accelerate import init_empty_weights

    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return False
    settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
    if settings.get("quant_method") != QUANT_METHOD:
        return False
    layers = settings.get("layers")
    if not isinstance(layers, dict):
        raise CompressError(f"{where}: quantization_config.layers must map layer names to their settings")
    with init_empty_weights(include_buffers=True):
        install_compressed(
            model, settings.get("format_version"), layers, settings.get("structure"), where, settings.get("embeddings")
        )
    return True
