"""`power`: a uniform asymmetric grid in the power domain (NUPES).

    t = sign(w) * |w|**a                 the power transform, exponent a in (0, 1]
    t_q = (q - z) * s                    q in [0, 2**bits - 1], per group of `group_size` input weights
    w_q = sign(t_q) * |t_q|**(1 / a)     decoded weight

Every one of the 2**bits levels is a distinct value (an even count of levels has no wasted code). With a = 1 the
grid is the `uniform` format's. A small exponent puts more levels near zero, where bell-shaped weights live.

Stored tensors (safetensors keys under the layer's name):
    qweight    uint8   [out_features, packed_length(in_features, bits)]   codes q, bit-packed per row
    qzeros     uint8   [packed_length(out_features * num_groups, bits)]   zero points z, row-major, bit-packed
    scales     float16 [out_features, num_groups]                          power-domain step s
    exponents  float16 [1] (per layer) or [out_features] (per channel)     exponent a
    bias       float16 [out_features]                                      only if the linear had one
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.formats.grid import GroupedGridLinear, grouped
from compress.registry import register_format

MIN_EXPONENT = 0.05


def power(weight: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """`sign(w) * |w|**a`, with `exponent` broadcast over rows (`[1]` or `[out_features]`)."""
    return _signed_power(weight, exponent.reshape(-1, 1))


def inverse_power(values: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """`sign(t) * |t|**(1/a)`, differentiable in `values` and `exponent` (finite gradient at t = 0)."""
    return _signed_power(values, 1.0 / exponent.reshape(-1, 1))


def _signed_power(values: torch.Tensor, power_: torch.Tensor) -> torch.Tensor:
    magnitude = values.abs()
    if not (torch.is_grad_enabled() and (values.requires_grad or power_.requires_grad)):
        return torch.sign(values) * magnitude.pow(power_)  # same values; the path below only serves gradients
    nonzero = magnitude > 0
    safe = torch.where(nonzero, magnitude, torch.ones_like(magnitude))
    # exp(p * log|x|) keeps the gradient in p finite; zeros stay exactly zero.
    result = torch.exp(power_ * torch.log(safe))
    return torch.where(nonzero, torch.sign(values) * result, torch.zeros_like(values))


def grid_params(
    transformed: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max grid of each group in the power domain, its range shrunk by `clip` (scalar or `[out, 1]`).

    Returns `scales [out, groups]` (float32 holding float16 values) and integer `zeros [out, groups]`.
    """
    groups = grouped(transformed, group_size)
    qmax = (1 << bits) - 1
    low = groups.amin(dim=-1) * clip
    high = groups.amax(dim=-1) * clip
    scales = ((high - low) / qmax).half().float()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-low / scales).clamp(0, qmax).to(torch.int64)
    return scales, zeros


def decode(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, exponent: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Dense weight `[out, in]` from codes and parameters (float32; differentiable in scales and exponent)."""
    levels = (grouped(codes.float(), group_size) - zeros.unsqueeze(-1).float()) * scales.unsqueeze(-1)
    return inverse_power(levels.reshape(codes.shape), exponent)


def grid_positions(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, exponent: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Where each weight lies on its group's grid, in code units (`power(w) / s + z`, unrounded, `[out, in]`)."""
    position = grouped(power(weight.float(), exponent), group_size) / scales.unsqueeze(-1) + zeros.unsqueeze(-1)
    return position.reshape(weight.shape)


def nearest_codes(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, exponent: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The code whose decoded value is nearest to each weight (in the weight domain, not the power domain):
    the two grid levels around `power(w)` are decoded and the closer one kept. Returns the codes (int64
    `[out, in]`) and their decoded values."""
    qmax = (1 << bits) - 1
    below = grid_positions(weight, scales, zeros, exponent, group_size).floor().clamp(0, qmax)
    above = (below + 1).clamp(0, qmax)
    value_below = decode(below, scales, zeros, exponent, group_size)
    value_above = decode(above, scales, zeros, exponent, group_size)
    closer_above = (value_above - weight).abs() < (value_below - weight).abs()
    return torch.where(closer_above, above, below).to(torch.int64), torch.where(closer_above, value_above, value_below)


@register_format("power")
class PowerLinear(GroupedGridLinear):
    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int, exponent_per: str
    ) -> None:
        super().__init__(in_features, out_features, bias, bits, group_size)
        if exponent_per not in ("layer", "channel"):
            raise ValueError(f"exponent_per must be 'layer' or 'channel', got {exponent_per!r}")
        self.exponent_per = exponent_per
        self.exponents = nn.Parameter(torch.ones(out_features if exponent_per == "channel" else 1), requires_grad=False)

    def settings(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "exponent_per": self.exponent_per}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, settings: dict[str, Any]) -> PowerLinear:
        return cls(
            in_features,
            out_features,
            bias,
            bits=int(settings["bits"]),
            group_size=int(settings["group_size"]),
            exponent_per=str(settings["exponent_per"]),
        )

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        exponent: torch.Tensor,
        clip: torch.Tensor | float = 1.0,
    ) -> PowerLinear:
        """Nearest codes on the (clipped) min/max power-domain grid for the given exponent (`[1]` or `[out]`)."""
        out_features, in_features = weight.shape
        exponent_per = "channel" if exponent.numel() > 1 else "layer"
        module = cls(in_features, out_features, bias is not None, bits, group_size, exponent_per).to(weight.device)
        module.exponents.data.copy_(exponent.reshape(-1).half().float())
        module.set_grid(*grid_params(power(weight.float(), module.exponents), bits, group_size, clip))
        module.encode(weight)
        if bias is not None:
            module.bias.data.copy_(bias.detach().float())
        return module

    def dequantize(self) -> torch.Tensor:
        return decode(self.codes(), self.scales, self.zeros(), self.exponents.clamp_min(MIN_EXPONENT), self.group_size)

    def _nearest(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        rows: torch.Tensor | None,
        group_size: int,
    ) -> torch.Tensor:
        exponent = self.exponents.detach().clamp_min(MIN_EXPONENT)
        if rows is not None and exponent.numel() > 1:
            exponent = exponent[rows]
        return nearest_codes(weight, scales, zeros, exponent, self.bits, group_size)[0]
