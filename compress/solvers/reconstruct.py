"""Block output reconstruction for power-grid layers (NUPES data-driven mode).

Each layer's codes become continuous latent values `v` in `[0, 2**bits - 1]`, rounded in the forward pass with
a straight-through estimator, so a code can travel across the whole grid rather than only up or down (AdaRound's
limit). A latent starts where its weight was on the grid when it was rounded (GPTQ's error-updated value, kept
within half a step of its code so that the first forward gives the rounded codes), not on the integer: a weight
that was near the boundary between two levels needs only a small move to change its code, one on a level a
large one. The learning rate is in grid steps per step (Adam's steps are about that size).

The exponent is learned too, kept in `[min_exponent, 1]` by `a = lo + (1 - lo) * sigmoid(theta)`; the
power is computed as `exp(p * log|t|)`, whose gradient in `p` stays finite. Scales are learned in log space.
The loss is the block's relative output error `||B_q(X) - Y||^2 / ||Y||^2` on calibration batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import NumericError
from compress.formats.power import PowerLinear, decode

HALF_STEP = 0.49  # how far from its code a latent may start (under half a step: it still rounds to the code)


@dataclass(frozen=True)
class ReconstructionSettings:
    steps: int  # each step is one calibration batch
    learning_rate: float  # latent codes, in grid steps per optimiser step (Adam)
    scale_learning_rate: float  # log-scales
    exponent_learning_rate: float  # exponent logit
    min_exponent: float
    seed: int
    cosine: bool = False  # every learning rate decays to 0 over the steps


class LatentPowerLinear(nn.Module):
    """Training stand-in for a `PowerLinear`: continuous codes, log-scales and an exponent logit."""

    def __init__(self, layer: PowerLinear, min_exponent: float, start: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.min_exponent = min_exponent
        self.qmax = (1 << layer.bits) - 1
        codes = layer.codes().float()
        offset = torch.zeros_like(codes) if start is None else (start - codes).clamp(-HALF_STEP, HALF_STEP)
        self.latent = nn.Parameter(codes + offset)
        self.log_scales = nn.Parameter(torch.zeros_like(layer.scales))
        share = ((layer.exponents.detach() - min_exponent) / (1 - min_exponent)).clamp(1e-3, 1 - 1e-3)
        self.exponent_logit = nn.Parameter(torch.log(share / (1 - share)))
        self.register_buffer("zeros", layer.zeros())

    def exponent(self) -> torch.Tensor:
        return self.min_exponent + (1 - self.min_exponent) * torch.sigmoid(self.exponent_logit)

    def codes(self) -> torch.Tensor:
        return self.latent.detach().clamp(0, self.qmax).round().to(torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.latent.clamp(0, self.qmax)
        codes = latent + (latent.round() - latent).detach()
        scales = self.layer.scales.detach() * torch.exp(self.log_scales)
        weight = decode(codes, scales, self.zeros, self.exponent(), self.layer.group_size)
        bias = None if self.layer.bias is None else self.layer.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    @torch.no_grad()
    def write_back(self) -> PowerLinear:
        """Store the learned values in the layer: scales and exponent rounded to float16, codes re-chosen."""
        layer = self.layer
        layer.scales.copy_((layer.scales * torch.exp(self.log_scales)).half().float())
        layer.exponents.copy_(self.exponent().half().float())
        layer.set_codes(self.codes())
        return layer


def reconstruct_block(
    block: nn.Module,
    layers: dict[str, PowerLinear],
    inputs,
    targets,
    settings: ReconstructionSettings,
    batches: list[int] | None = None,
    starts: dict[str, torch.Tensor] | None = None,
) -> list[float]:
    """Learn codes, scales and exponents of `layers` (names relative to `block`) so the block reproduces
    `targets[b]` from batch `b` of `inputs` (a `BlockInputs`), for the training `batches` (default: all);
    `starts` are the latents' starting grid positions by layer (default: their codes).

    Returns the relative output error of each step's batch (the first is that of the starting codes)."""
    starts = starts or {}
    latents = {name: LatentPowerLinear(layer, settings.min_exponent, starts.get(name))
               for name, layer in layers.items()}  # fmt: skip
    groups = [
        {"params": [p.latent for p in latents.values()], "lr": settings.learning_rate},
        {"params": [p.log_scales for p in latents.values()], "lr": settings.scale_learning_rate, "clip": True},
        {"params": [p.exponent_logit for p in latents.values()], "lr": settings.exponent_learning_rate, "clip": True},
    ]
    return train_block(block, latents, groups, inputs, targets, settings.steps, settings.seed, batches=batches,
                       cosine=settings.cosine)  # fmt: skip


def train_block(
    block: nn.Module,
    latents: dict[str, nn.Module],
    parameter_groups: list[dict],
    inputs,
    targets: list[torch.Tensor],
    steps: int,
    seed: int,
    after_step: Callable[[int], None] | None = None,
    batches: list[int] | None = None,
    cosine: bool = False,
) -> list[float]:
    """The loop every block reconstruction shares: the `latents` (training stand-ins with a `write_back()` that
    returns the final layer) replace their layers in `block`; Adam on `parameter_groups` (a group with
    `"clip": True` has its gradient norm clipped to 1) minimises the relative output error
    `||B(X) - Y||^2 / ||Y||^2` on one random calibration batch per step (of `batches`, default all);
    `after_step(step)` runs after each update. With `cosine`, every learning rate decays to 0 over the steps
    (half a cosine), so that codes settle instead of flipping on the last steps' noise.
    Afterwards the written-back layers replace the latents. Returns each step's loss (the first: before learning)."""
    from compress.models import replace_module

    for name, latent in latents.items():
        replace_module(block, name, latent)
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    clipped = [p for group in parameter_groups if group.get("clip") for p in group["params"]]
    for group in parameter_groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    optimizer = torch.optim.Adam([{k: v for k, v in g.items() if k != "clip"} for g in parameter_groups])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))) if cosine else 1.0
    )
    generator = torch.Generator().manual_seed(seed)
    batches = list(range(len(inputs.hidden))) if batches is None else batches
    losses = []
    try:
        for step in range(steps):
            batch = batches[int(torch.randint(len(batches), (1,), generator=generator))]
            loss = batch_error(block, inputs, targets, batch)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise NumericError(f"block reconstruction: the loss became {losses[-1]} at step {len(losses)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clipped:
                torch.nn.utils.clip_grad_norm_(clipped, 1.0)
            optimizer.step()
            schedule.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(step)
    finally:
        for name, latent in latents.items():
            replace_module(block, name, latent.write_back())
        for parameter in block.parameters():
            parameter.requires_grad_(False)
    return losses


def batch_error(block: nn.Module, inputs, targets, batch: int) -> torch.Tensor:
    """The block's relative output error `||B(X) - Y||^2 / ||Y||^2` on calibration batch `batch`."""
    output = block(inputs.hidden[batch], *inputs.args[batch], **inputs.kwargs[batch])
    output = output[0] if isinstance(output, (tuple, list)) else output
    return (output - targets[batch]).pow(2).sum() / targets[batch].pow(2).sum()


@torch.no_grad()
def block_error(block: nn.Module, inputs, targets, batches: list[int]) -> float:
    """The block's relative output error over `batches` (the summed squared error over the summed target energy)."""
    error = energy = 0.0
    for batch in batches:
        output = block(inputs.hidden[batch], *inputs.args[batch], **inputs.kwargs[batch])
        output = output[0] if isinstance(output, (tuple, list)) else output
        error += float((output - targets[batch]).pow(2).sum())
        energy += float(targets[batch].pow(2).sum())
    return error / energy if energy else 0.0
