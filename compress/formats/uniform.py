"""`uniform`: asymmetric integer grid per group of `group_size` input weights of a row.

    w = (q - z) * s,   q in [0, 2**bits - 1],   z integer in the same range

Stored tensors (safetensors keys under the layer's name):
    qweight  uint8   [out_features, packed_length(in_features, bits)]   codes q, bit-packed per row
    qzeros   uint8   [packed_length(out_features * num_groups, bits)]   zero points z, row-major, bit-packed flat
    scales   float16 [out_features, num_groups]                          step s
    bias     float16 [out_features]                                      only if the linear had one
"""

from __future__ import annotations

from typing import Any

import torch

from compress.formats.grid import GroupedGridLinear, grouped
from compress.formats.packing import unpack_bits
from compress.registry import register_format


def minmax_params(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to float16) and integer zero point per group for the asymmetric min/max grid.

    The range always contains 0, so zero is exactly representable (as in GPTQ and llm-compressor).
    Returns `scales [out, groups]` (float32 holding float16 values) and `zeros [out, groups]` (int64).
    """
    groups = grouped(weight.float(), group_size)
    qmax = (1 << bits) - 1
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    scales = ((high - low) / qmax).half().float()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-low / scales).clamp(0, qmax).to(torch.int64)
    return scales, zeros


def round_to_grid(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Nearest code per weight for fixed scales and zeros: int64 `[out, in]`."""
    groups = grouped(weight.float(), group_size)
    codes = torch.round(groups / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    return codes.clamp(0, (1 << bits) - 1).to(torch.int64).reshape(weight.shape)


def dequantize_grid(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(q - z) * s` per group, float32 `[out, in]`."""
    groups = grouped(codes.float(), group_size) - zeros.unsqueeze(-1).float()
    return (groups * scales.unsqueeze(-1)).reshape(codes.shape)


@register_format("uniform")
class UniformLinear(GroupedGridLinear):
    def settings(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, settings: dict[str, Any]) -> UniformLinear:
        return cls(in_features, out_features, bias, bits=int(settings["bits"]), group_size=int(settings["group_size"]))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int) -> UniformLinear:
        """Round-to-nearest on the min/max grid of each group."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, bits, group_size).to(weight.device)
        module.set_grid(*minmax_params(weight, bits, group_size))
        module.encode(weight)
        if bias is not None:
            module.bias.data.copy_(bias.detach().float())
        return module

    def dequantize(self) -> torch.Tensor:
        return dequantize_grid(self.codes(), self.scales, self.zeros(), self.group_size)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of the dense weight, float32 `[len(rows), in_features]`, unpacking only their codes (an
        embedding served from this layer's codes). The zero points are unpacked once per change of `qzeros`."""
        key = (self.qzeros.data_ptr(), self.qzeros._version)
        if self.__dict__.get("_zeros_key") != key:
            count = self.out_features * self.num_groups
            self.__dict__["_zeros_rows"] = unpack_bits(self.qzeros, self.bits, count).view(self.out_features, -1)
            self.__dict__["_zeros_key"] = key
        codes = unpack_bits(self.qweight[rows], self.bits, self.in_features)
        return dequantize_grid(codes, self.scales[rows], self.__dict__["_zeros_rows"][rows], self.group_size)

    def _nearest(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        rows: torch.Tensor | None,
        group_size: int,
    ) -> torch.Tensor:
        return round_to_grid(weight, scales, zeros, self.bits, group_size)
