"""What the `uniform` and `power` formats share: integer codes and zero points on a grid per group of
`group_size` input weights, bit-packed, with a float scale per group."""

from __future__ import annotations

import torch
from torch import nn

from compress.formats.base import QuantizedLinear
from compress.formats.packing import pack_bits, packed_length, unpack_bits


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[out, in]` -> `[out, in // group_size, group_size]`."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features, in_features // group_size, group_size)


class GroupedGridLinear(QuantizedLinear):
    """Holds `qweight` (codes, packed per row), `qzeros` (zero points, packed flat) and `scales [out, groups]`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int) -> None:
        super().__init__(in_features, out_features, bias)
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.bits = bits
        self.group_size = group_size
        num_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_length(in_features, bits), dtype=torch.uint8))
        self.register_buffer("qzeros", torch.zeros(packed_length(out_features * num_groups, bits), dtype=torch.uint8))
        self.scales = nn.Parameter(torch.ones(out_features, num_groups), requires_grad=False)

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, self.bits, self.in_features).to(torch.int64)

    def set_codes(self, codes: torch.Tensor) -> None:
        self.qweight.copy_(pack_bits(codes, self.bits))

    def zeros(self) -> torch.Tensor:
        count = self.out_features * self.num_groups
        return unpack_bits(self.qzeros, self.bits, count).to(torch.int64).view(self.out_features, self.num_groups)

    def set_grid(self, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        self.scales.data.copy_(scales)
        self.qzeros.copy_(pack_bits(zeros.flatten(), self.bits))
