"""`nupes`: power-exponent non-uniform quantization (NUPES), format `power`.

data-free: exponent and clipping per layer (or per output channel) chosen by weight reconstruction error.
data-driven: block by block on calibration activations, (1) exponent and clipping chosen by the layer's output
error (input-Hessian-weighted), (2) codes by Hessian-aware rounding with error feedback in the power grid (GPTQ),
(3) codes over the whole grid, scales and exponents learned jointly on the block's output error.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.calib import run_collecting
from compress.errors import CompressError, NumericError
from compress.formats.power import PowerLinear, nearest_codes
from compress.models import dense_weight, replace_module
from compress.registry import STAGES, register_block_stage
from compress.solvers.gptq import HessianAccumulator, gptq_round
from compress.solvers.power_search import search_exponent_and_clip
from compress.solvers.reconstruct import ReconstructionSettings, reconstruct_block
from compress.stages.base import LayerSelection, block_linears, check_finite, group_size_problems, relative_error

log = logging.getLogger(__name__)


class NupesConfig(LayerSelection):
    bits: int = Field(3, ge=2, le=8)
    group_size: int | None = Field(64, ge=1, description="input weights per scale; null for one scale per row")
    mode: Literal["data-free", "data-driven"] = "data-free"
    exponent_per: Literal["layer", "channel"] = "layer"
    min_exponent: float = Field(0.4, gt=0.0, le=1.0, description="smallest exponent searched and learned")
    exponent_candidates: int = Field(13, ge=1, description="exponents searched, evenly spaced in [min_exponent, 1]")
    min_clip: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="smallest ratio of each group's range searched; default 1.0 (no clipping) in data-free mode, "
        "where clipping chosen by weight error cost perplexity on smollm2-135m, 0.75 in data-driven mode",
    )
    clip_candidates: int = Field(6, ge=1)
    damping: float = Field(0.01, ge=0.0, description="GPTQ damping, a fraction of the mean Hessian diagonal")
    gptq: bool = Field(True, description="data-driven: Hessian-aware rounding before learning")
    steps: int = Field(
        16, ge=0, le=1_000_000, description="data-driven: optimiser steps per block (one calibration batch each)"
    )
    batch_size: int = Field(4, ge=1, le=4096, description="data-driven: calibration windows per batch")
    learning_rate: float = Field(0.005, ge=0.0, description="latent codes, in grid steps per step")
    scale_learning_rate: float = Field(3e-3, ge=0.0, description="log-scales")
    exponent_learning_rate: float = Field(3e-2, ge=0.0, description="exponent logit")

    @model_validator(mode="after")
    def _grid_is_searchable(self) -> NupesConfig:
        if self.exponent_candidates == 1 and self.min_exponent != 1.0:
            raise ValueError("exponent_candidates: 1 searches only the exponent 1; set min_exponent: 1.0")
        return self


def _calibration_batch(config: NupesConfig) -> int | None:
    return config.batch_size if config.mode == "data-driven" else None


@register_block_stage("nupes", NupesConfig, calibration_batch=_calibration_batch, quantizes=True,
                      check=group_size_problems)  # fmt: skip
def compress_block(block, index: int, name: str, inputs, config: NupesConfig, context) -> dict | None:
    linears = block_linears(block, name, config)
    if config.mode == "data-free":
        for relative, linear in linears.items():
            weight = _checked_weight(f"{name}.{relative}", linear, config)
            exponent, clip = _search(weight, config, importance=None)
            layer = PowerLinear.from_weight(weight, linear.bias, config.bits, _group(config, weight), exponent, clip)
            context.record_layer(f"{name}.{relative}", layer, relative_error(weight, layer.dequantize()))
            replace_module(block, relative, layer)
        return None
    if not linears:
        return None
    targets, hessians = run_collecting(
        block, inputs, linears, lambda linear: HessianAccumulator(dense_weight(linear).shape[1])
    )
    for output in targets:
        check_finite(output, f"nupes: block {name} output")
    layers = {}
    for relative, linear in linears.items():
        weight = _checked_weight(f"{name}.{relative}", linear, config)
        hessian = hessians[relative].hessian.float()
        exponent, clip = _search(weight, config, importance=torch.diag(hessian))
        layer = PowerLinear.from_weight(weight, linear.bias, config.bits, _group(config, weight), exponent, clip)
        if config.gptq:
            layer.set_codes(_gptq_codes(layer, weight, hessian, config.damping))
        layers[relative] = layer
        replace_module(block, relative, layer)
    settings = ReconstructionSettings(
        steps=config.steps,
        learning_rate=config.learning_rate,
        scale_learning_rate=config.scale_learning_rate,
        exponent_learning_rate=config.exponent_learning_rate,
        min_exponent=config.min_exponent,
        seed=context.recipe.seed,
    )
    try:
        losses = reconstruct_block(block, layers, inputs, targets, settings) if config.steps else []
    except NumericError as error:
        raise NumericError(f"nupes: block {name}: {error}; the stage stopped and nothing was written") from error
    for relative, layer in layers.items():
        weight = dense_weight(linears[relative])
        context.record_layer(f"{name}.{relative}", layer, relative_error(weight, layer.dequantize()))
    if losses:
        log.info("block %s: relative output error %.5f -> %.5f", name, losses[0], losses[-1])
        return {"error": f"{losses[0]:.4f}->{losses[-1]:.4f}"}
    return None


apply = STAGES["nupes"].apply  # the whole model, block by block


def _gptq_codes(layer: PowerLinear, weight: torch.Tensor, hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Error-feedback rounding on the layer's power grid (its scales, zeros and exponents stay fixed)."""
    scales, zeros, exponent = layer.scales.detach(), layer.zeros(), layer.exponents.detach()
    group_size = layer.group_size
    exponent_column = exponent.reshape(-1)

    def quantize_column(column: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        group = index // group_size
        s, z = scales[:, group : group + 1], zeros[:, group : group + 1]
        codes, decoded = nearest_codes(column.unsqueeze(1), s, z, exponent_column, layer.bits, 1)
        return codes.squeeze(1), decoded.squeeze(1)

    return gptq_round(weight.float(), hessian, quantize_column, damping=damping)


def _search(weight: torch.Tensor, config: NupesConfig, importance: torch.Tensor | None):
    exponents = torch.linspace(config.min_exponent, 1.0, config.exponent_candidates)
    min_clip = config.min_clip or (1.0 if config.mode == "data-free" else 0.75)
    clips = torch.linspace(min_clip, 1.0, config.clip_candidates if min_clip < 1.0 else 1)
    return search_exponent_and_clip(
        weight.float(), config.bits, _group(config, weight), exponents, clips,
        per_channel=config.exponent_per == "channel", importance=importance,
    )  # fmt: skip


def _group(config: NupesConfig, weight: torch.Tensor) -> int:
    return config.group_size or weight.shape[1]


def _checked_weight(name: str, linear, config: NupesConfig) -> torch.Tensor:
    weight = dense_weight(linear)
    check_finite(weight, f"nupes: layer {name} weight")
    if weight.shape[1] % _group(config, weight):
        raise CompressError(
            f"nupes: group_size {config.group_size} does not divide layer {name}'s {weight.shape[1]} input features"
        )
    return weight
