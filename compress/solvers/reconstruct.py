"""Block output reconstruction for power-grid layers (NUPES data-driven mode).

Each layer's codes become continuous latent values `v` in `[0, 2**bits - 1]`, rounded in the forward pass with
a straight-through estimator, so a code can travel across the whole grid rather than only up or down (AdaRound's
limit). The exponent is learned too, kept in `[min_exponent, 1]` by `a = lo + (1 - lo) * sigmoid(theta)`; the
power is computed as `exp(p * log|t|)`, whose gradient in `p` stays finite. Scales are learned in log space.
The loss is the block's relative output error `||B_q(X) - Y||^2 / ||Y||^2` on calibration batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import NumericError
from compress.formats.power import PowerLinear, decode


@dataclass(frozen=True)
class ReconstructionSettings:
    steps: int  # each step is one calibration batch
    learning_rate: float  # latent codes, in grid steps per optimiser step (Adam)
    scale_learning_rate: float  # log-scales
    exponent_learning_rate: float  # exponent logit
    min_exponent: float
    seed: int


class LatentPowerLinear(nn.Module):
    """Training stand-in for a `PowerLinear`: continuous codes, log-scales and an exponent logit."""

    def __init__(self, layer: PowerLinear, min_exponent: float) -> None:
        super().__init__()
        self.layer = layer
        self.min_exponent = min_exponent
        self.qmax = (1 << layer.bits) - 1
        self.latent = nn.Parameter(layer.codes().float())
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
    targets: list[torch.Tensor],
    settings: ReconstructionSettings,
) -> list[float]:
    """Learn codes, scales and exponents of `layers` (names relative to `block`) so the block reproduces
    `targets` from `inputs` (a `BlockInputs`, whose batches are the training batches).

    Returns the relative output error of each step's batch (the first is that of the starting codes)."""
    from compress.models import replace_module

    latents = {name: LatentPowerLinear(layer, settings.min_exponent) for name, layer in layers.items()}
    for name, latent in latents.items():
        replace_module(block, name, latent)
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    codes = [p.latent for p in latents.values()]
    scales = [p.log_scales for p in latents.values()]
    exponents = [p.exponent_logit for p in latents.values()]
    for parameter in codes + scales + exponents:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(
        [
            {"params": codes, "lr": settings.learning_rate},
            {"params": scales, "lr": settings.scale_learning_rate},
            {"params": exponents, "lr": settings.exponent_learning_rate},
        ]
    )
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    for _ in range(settings.steps):
        batch = int(torch.randint(len(inputs.hidden), (1,), generator=generator))
        output = block(inputs.hidden[batch], *inputs.args[batch], **inputs.kwargs[batch])
        output = output[0] if isinstance(output, (tuple, list)) else output
        loss = (output - targets[batch]).pow(2).sum() / targets[batch].pow(2).sum()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise NumericError(f"block reconstruction: the loss became {losses[-1]} at step {len(losses)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(exponents + scales, 1.0)
        optimizer.step()
    for name, latent in latents.items():
        replace_module(block, name, latent.write_back())
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    return losses
