"""`nupes`: power-exponent non-uniform quantization (NUPES), format `power`.

data-free: exponent and clipping per layer (or per output channel) chosen by weight reconstruction error.
data-driven: block by block on calibration activations, (1) exponent and clipping chosen by the layer's output
error (input-Hessian-weighted), (2) codes and each group's scale and zero by Hessian-aware rounding with error
feedback in the power grid (GPTQ; a group's parameters chosen when the sweep reaches it, optionally in
activation order), (3) codes over the whole grid, scales and exponents learned jointly on the block's output
error. One calibration batch in eight (at least one, given two) is held out of (2) and (3); each block reports
its output error on it and on the training batches before and after (3), and the share of codes (3) changed.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.calib import ByBatch, run_collecting
from compress.errors import CompressError, NumericError
from compress.formats.power import PowerLinear, grid_positions
from compress.models import dense_weight, replace_module
from compress.registry import STAGES, register_block_stage
from compress.solvers.gptq import HessianAccumulator, gptq_power_grid
from compress.solvers.power_search import search_exponent_and_clip
from compress.solvers.reconstruct import ReconstructionSettings, block_error, reconstruct_block
from compress.stages.base import LayerSelection, block_linears, check_finite, group_size_problems, relative_error

log = logging.getLogger(__name__)


class NupesConfig(LayerSelection):
    bits: int = Field(3, ge=2, le=8, description="bits per weight of the codes")
    group_size: int | None = Field(64, ge=1, description="input weights per scale; null for one scale per row")
    mode: Literal["data-free", "data-driven"] = Field(
        "data-free", description="data-free: exponent and clip chosen by weight error; data-driven: block by block "
        "on calibration activations (GPTQ rounding, then codes, scales and exponents learned)")  # fmt: skip
    exponent_per: Literal["layer", "channel"] = Field("layer", description="one exponent per layer or per output row")
    min_exponent: float = Field(0.4, gt=0.0, le=1.0, description="smallest exponent searched and learned")
    exponent_candidates: int = Field(13, ge=1, description="exponents searched, evenly spaced in [min_exponent, 1]")
    min_clip: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="smallest ratio of each group's range searched; default 1.0 (no clipping) in data-free mode, "
        "where clipping chosen by weight error cost perplexity on smollm2-135m, 0.75 in data-driven mode",
    )
    clip_candidates: int = Field(6, ge=1, description="clip ratios searched, evenly spaced in [min_clip, 1]")
    damping: float = Field(0.01, ge=0.0, description="GPTQ damping, a fraction of the mean Hessian diagonal")
    gptq: bool = Field(True, description="data-driven: Hessian-aware rounding before learning")
    gptq_groups: Literal["lazy", "static"] = Field(
        "lazy", description="lazy: a group's scale and zero from its error-updated weights when the sweep reaches "
        "it (GPTQ's way); static: from the original weights before the sweep")
    act_order: bool = Field(True, description="GPTQ sweeps the columns by decreasing Hessian diagonal")
    group_min_clip: float = Field(0.5, gt=0.0, le=1.0, description="lazy GPTQ: smallest clip ratio searched for "
                                  "each row of a group on its error-updated weights")
    group_clip_candidates: int = Field(11, ge=1, description="lazy GPTQ: clip ratios searched in [group_min_clip, 1]"
                                       " (1: the group's min/max times the layer's clip)")
    steps: int = Field(
        16, ge=0, le=1_000_000, description="data-driven: optimiser steps per block (one calibration batch each)"
    )
    batch_size: int = Field(4, ge=1, le=4096, description="data-driven: calibration windows per batch")
    learning_rate: float = Field(0.005, ge=0.0, description="latent codes, in grid steps per step (0: codes frozen)")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rates over the steps")
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
    train, held = split_batches(len(inputs.hidden))
    outputs, hessians = run_collecting(
        block, inputs, linears, lambda linear: HessianAccumulator(dense_weight(linear).shape[1]), batches=train
    )
    targets = ByBatch()
    targets.add(train, outputs)
    targets.add(held, inputs.run(block, held))
    for output in targets.values():
        check_finite(output, f"nupes: block {name} output")
    layers, starts = {}, {}
    for relative, linear in linears.items():
        weight = _checked_weight(f"{name}.{relative}", linear, config)
        hessian = hessians[relative].hessian.float()
        exponent, clip = _search(weight, config, importance=torch.diag(hessian))
        layer = PowerLinear.from_weight(weight, linear.bias, config.bits, _group(config, weight), exponent, clip)
        if config.gptq:
            lazy = config.gptq_groups == "lazy"
            codes, scales, zeros, starts[relative] = gptq_power_grid(
                weight, hessian, layer.exponents.detach(), clip, config.bits, layer.group_size, config.damping,
                act_order=config.act_order, clips=_group_clips(config) if lazy else None,
                grid=None if lazy else (layer.scales.detach(), layer.zeros()),
            )  # fmt: skip
            layer.set_grid(scales, zeros)
            layer.set_codes(codes)
        else:
            starts[relative] = grid_positions(weight, layer.scales.detach(), layer.zeros(), layer.exponents.detach(),
                                              layer.group_size)  # fmt: skip
        layers[relative] = layer
        replace_module(block, relative, layer)
    figures = {}
    if config.steps:
        before = {relative: layer.codes().clone() for relative, layer in layers.items()}
        sample = train[:: max(1, len(train) // 4)][:4]  # the training error, on up to four of its batches
        figures.update(train_before=block_error(block, inputs, targets, sample),
                       held_before=block_error(block, inputs, targets, held) if held else None)  # fmt: skip
        settings = ReconstructionSettings(
            steps=config.steps,
            learning_rate=config.learning_rate,
            scale_learning_rate=config.scale_learning_rate,
            exponent_learning_rate=config.exponent_learning_rate,
            min_exponent=config.min_exponent,
            seed=context.recipe.seed,
            cosine=config.schedule == "cosine",
        )
        try:
            reconstruct_block(block, layers, inputs, targets, settings, batches=train, starts=starts)
        except NumericError as error:
            raise NumericError(f"nupes: block {name}: {error}; the stage stopped and nothing was written") from error
        changed = sum(int((layers[r].codes() != codes).sum()) for r, codes in before.items())
        figures.update(train_after=block_error(block, inputs, targets, sample),
                       held_after=block_error(block, inputs, targets, held) if held else None,
                       codes_changed=changed / sum(codes.numel() for codes in before.values()))  # fmt: skip
        context.metrics.setdefault("blocks", {})[name] = figures
        _summarise(context.metrics)
    for relative, layer in layers.items():
        weight = dense_weight(linears[relative])
        context.record_layer(f"{name}.{relative}", layer, relative_error(weight, layer.dequantize()))
    if figures:
        log.info("block %s: output error %s, %.1f%% of codes changed by learning", name, _change(figures),
                 100 * figures["codes_changed"])  # fmt: skip
        return {"error": _change(figures), "changed": f"{100 * figures['codes_changed']:.1f}%"}
    return None


def _group_clips(config: NupesConfig) -> torch.Tensor | None:
    if config.group_clip_candidates == 1:
        return None
    return torch.linspace(config.group_min_clip, 1.0, config.group_clip_candidates)


def split_batches(count: int) -> tuple[list[int], list[int]]:
    """Training and held-out calibration batches: the last one in eight is held out (at least one of two)."""
    held = max(1, count // 8) if count >= 2 else 0
    return list(range(count - held)), list(range(count - held, count))


def _change(figures: dict) -> str:
    key = "held" if figures.get("held_before") is not None else "train"
    return f"{figures[key + '_before']:.4g}->{figures[key + '_after']:.4g} ({key})"


def _summarise(metrics: dict) -> None:
    """The stage's headline figures over its blocks so far: the mean share of codes changed by learning, and
    the mean block output error on the held-out and training batches before and after it."""
    blocks = list(metrics["blocks"].values())
    summary = {"codes_changed": sum(b["codes_changed"] for b in blocks) / len(blocks)}
    for key in ("held_before", "held_after", "train_before", "train_after"):
        values = [b[key] for b in blocks if b.get(key) is not None]
        if values:
            summary[key] = sum(values) / len(values)
    metrics["summary"] = summary


apply = STAGES["nupes"].apply  # the whole model, block by block


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
