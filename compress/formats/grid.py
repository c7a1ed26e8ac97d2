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
        return self.unpacked(self.qweight, self.bits, self.in_features)

    def set_codes(self, codes: torch.Tensor) -> None:
        self.qweight.copy_(pack_bits(codes, self.bits))

    def zeros(self) -> torch.Tensor:
        count = self.out_features * self.num_groups
        return unpack_bits(self.qzeros, self.bits, count).to(torch.int64).view(self.out_features, self.num_groups)

    def set_grid(self, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        self.scales.data.copy_(scales)
        self.qzeros.copy_(pack_bits(zeros.flatten(), self.bits))

    def encode(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Nearest codes for `weight` on the current grid, only where `mask` is true. A sparse mask (fine-tuning
        re-encodes about 1% of the weights per step) is handled element by element, without touching the rest."""
        weight = weight.detach().float()
        scales, zeros = self.scales.detach(), self.zeros()
        if mask is not None and int(mask.sum()) * 8 < mask.numel():
            rows, columns = mask.nonzero(as_tuple=True)
            groups = columns // self.group_size
            chosen = self._nearest(
                weight[rows, columns].unsqueeze(1), scales[rows, groups].unsqueeze(1), zeros[rows, groups].unsqueeze(1),
                rows, group_size=1,
            )  # fmt: skip
            codes = self.codes().clone()
            codes[rows, columns] = chosen.squeeze(1)
        else:
            codes = self._nearest(weight, scales, zeros, None, self.group_size)
            if mask is not None:
                codes = torch.where(mask, codes, self.codes())
        self.set_codes(codes)

    def _nearest(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        rows: torch.Tensor | None,
        group_size: int,
    ) -> torch.Tensor:
        """Nearest codes (int64, shaped like `weight`) for weights grouped by `group_size` along their last dimension
        with one scale and zero per group; `rows` names the output row of each row of `weight` (None: all rows)."""
        raise NotImplementedError
