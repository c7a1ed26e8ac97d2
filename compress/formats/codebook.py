"""`codebook`: output neurons in groups, each group with its own learned codebook of scalars or vectors (JLCM).

A row of the weight is cut into `in_features / vector_dim` vectors of `vector_dim` consecutive input weights; each
vector is stored as a `code_bits`-bit index into its group's codebook of `2**code_bits` entries, so codes cost
`code_bits / vector_dim` bits per weight (vector_dim 1: a scalar codebook). Rows are stored in group order:

    stored row i   = original row permutation[i]            (identity when there is no `permutation`)
    group of row i = i // (out_features / num_groups)        (groups are contiguous and of equal size)
    W[permutation[i], v*d:(v+1)*d] = scales[i] * codebooks[group(i), codes[i, v]]
    W[permutation[i], column_indices[k]] = column_weights[i, k]     (kept columns replace the decoded value)

Stored tensors (safetensors keys under the layer's name):
    codes        uint8   [out_features, packed_length(in_features / vector_dim, code_bits)]  indices, packed per row
    codebooks    float16 [num_groups, 2**code_bits, vector_dim]                            entries
    scales       float16 [out_features]              per stored row; only with `row_scales`
    permutation  int16   [out_features]              original row of each stored row; only if rows were regrouped
    column_indices int16 [kept_columns]              input features kept in float16 (ascending); only if any
    column_weights float16 [out_features, kept_columns]  their weights, per stored row, unscaled
    bias         float16 [out_features]              only if the linear had one

Kept columns are the input features with massive activations (a few per layer in LLMs, up to thousands of times
the mean energy): one shared codebook cannot hold their outlying weights, and the error there dominates the
layer's output error. They cost `16 * (out_features + 1) / (in_features * out_features)` bits per weight each.

A single codebook per vector makes the nearest entry the exact best code, so `encode` needs no beam search.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.formats.base import QuantizedLinear
from compress.formats.packing import pack_bits, packed_length
from compress.registry import register_format

MAX_ROWS = 1 << 15  # int16 permutation and column indices


def nearest_entries(
    vectors: torch.Tensor, codebooks: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Index of the entry of codebook `groups[n]` nearest to `vectors[n]` (Euclidean; with `weights [N, d]`, each
    element's squared difference weighted).

    vectors `[N, d]`, codebooks `[G, K, d]`, groups `[N]` (int64) -> int64 `[N]`. Works group by group, so memory
    stays about `N/G x K`."""
    codes = torch.empty(len(vectors), dtype=torch.int64, device=vectors.device)
    for group in torch.unique(groups).tolist():
        members = (groups == group).nonzero(as_tuple=True)[0]
        entries = codebooks[group]
        for start in range(0, len(members), 65536):
            chunk = members[start : start + 65536]
            chunk_weights = None if weights is None else weights[chunk]
            codes[chunk] = squared_distances(vectors[chunk], entries, chunk_weights).argmin(dim=1)
    return codes


def squared_distances(points: torch.Tensor, entries: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """`[N, K]` (optionally weighted) squared distances `sum_j w_nj (x_nj - c_kj)^2` of points `[N, d]` to entries
    `[K, d]`; `weights` `[N, d]` or None for all ones. One matrix product of the expanded square (no `[N, K, d]`
    intermediate); values within rounding of zero may come out slightly negative."""
    if weights is None:
        weights = torch.ones_like(points)
    left = torch.cat([(weights * points.pow(2)).sum(dim=1, keepdim=True), weights * points, weights], dim=1)
    ones = torch.ones(1, len(entries), dtype=entries.dtype, device=entries.device)
    right = torch.cat([ones, -2 * entries.t(), entries.pow(2).t()], dim=0)
    return left @ right


@register_format("codebook")
class CodebookLinear(QuantizedLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        code_bits: int,
        vector_dim: int,
        num_groups: int,
        row_scales: bool,
        permuted: bool,
        kept_columns: int = 0,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if not 1 <= code_bits <= 8:
            raise ValueError(f"code_bits must be in 1..8, got {code_bits}")
        if vector_dim < 1 or in_features % vector_dim:
            raise ValueError(f"vector_dim {vector_dim} does not divide in_features {in_features}")
        if num_groups < 1 or out_features % num_groups:
            raise ValueError(f"num_groups {num_groups} does not divide out_features {out_features}")
        if permuted and out_features > MAX_ROWS:
            raise ValueError(f"a permutation of {out_features} rows does not fit int16")
        if not 0 <= kept_columns <= in_features or (kept_columns and in_features > MAX_ROWS):
            raise ValueError(f"kept_columns {kept_columns} does not fit {in_features} input features (int16)")
        self.code_bits = code_bits
        self.vector_dim = vector_dim
        self.num_groups = num_groups
        self.row_scales = row_scales
        self.permuted = permuted
        self.kept_columns = kept_columns
        self.register_buffer(
            "codes", torch.zeros(out_features, packed_length(self.vectors_per_row, code_bits), dtype=torch.uint8)
        )
        self.codebooks = nn.Parameter(torch.zeros(num_groups, 1 << code_bits, vector_dim), requires_grad=False)
        if row_scales:
            self.scales = nn.Parameter(torch.ones(out_features), requires_grad=False)
        else:
            self.register_parameter("scales", None)
        if permuted:
            self.register_buffer("permutation", torch.arange(out_features, dtype=torch.int16))
        else:
            self.register_buffer("permutation", None)
        if kept_columns:
            self.register_buffer("column_indices", torch.arange(kept_columns, dtype=torch.int16))
            self.column_weights = nn.Parameter(torch.zeros(out_features, kept_columns), requires_grad=False)
        else:
            self.register_buffer("column_indices", None)
            self.register_parameter("column_weights", None)

    @property
    def vectors_per_row(self) -> int:
        return self.in_features // self.vector_dim

    @property
    def rows_per_group(self) -> int:
        return self.out_features // self.num_groups

    def settings(self) -> dict[str, Any]:
        settings = {
            "code_bits": self.code_bits,
            "vector_dim": self.vector_dim,
            "num_groups": self.num_groups,
            "row_scales": self.row_scales,
            "permuted": self.permuted,
        }
        if self.kept_columns:  # written only when used, so checkpoints without kept columns stay readable as before
            settings["kept_columns"] = self.kept_columns
        return settings

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, settings: dict[str, Any]) -> CodebookLinear:
        flags = {key: settings[key] for key in ("row_scales", "permuted")}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        return cls(
            in_features,
            out_features,
            bias,
            code_bits=int(settings["code_bits"]),
            vector_dim=int(settings["vector_dim"]),
            num_groups=int(settings["num_groups"]),
            kept_columns=int(settings.get("kept_columns", 0)),
            **flags,
        )

    @classmethod
    def from_parts(
        cls,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor | None,
        permutation: torch.Tensor | None,
        bias: torch.Tensor | None,
        kept: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> CodebookLinear:
        """A layer from unpacked `codes [out, in/d]`, `codebooks [G, K, d]`, row `scales [out]` and the stored rows'
        original indices `permutation [out]` (both in stored order, None to leave out); `kept`: the kept columns'
        indices `[k]` (ascending) and weights `[out, k]` (stored row order)."""
        out_features, vectors = codes.shape
        num_groups, entries, vector_dim = codebooks.shape
        module = cls(
            vectors * vector_dim,
            out_features,
            bias is not None,
            code_bits=max(1, (entries - 1).bit_length()),
            vector_dim=vector_dim,
            num_groups=num_groups,
            row_scales=scales is not None,
            permuted=permutation is not None,
            kept_columns=0 if kept is None else len(kept[0]),
        ).to(codebooks.device)
        if entries != 1 << module.code_bits:
            raise ValueError(f"a codebook needs a power-of-two number of entries, got {entries}")
        module.codebooks.data.copy_(codebooks.detach().float())
        if scales is not None:
            module.scales.data.copy_(scales.detach().float())
        if permutation is not None:
            module.permutation.copy_(permutation.to(torch.int16))
        if kept is not None and len(kept[0]):
            indices, weights = kept
            if len(indices) > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise ValueError("kept column indices must be ascending")
            module.column_indices.copy_(indices.to(torch.int16))
            module.column_weights.data.copy_(weights.detach().float())
        if bias is not None:
            module.bias.data.copy_(bias.detach().float())
        module.set_codes(codes)
        return module

    def unpacked_codes(self) -> torch.Tensor:
        """int64 `[out_features, in_features / vector_dim]`, in stored row order."""
        return self.unpacked(self.codes, self.code_bits, self.vectors_per_row)

    def set_codes(self, codes: torch.Tensor) -> None:
        self.codes.copy_(pack_bits(codes, self.code_bits))

    def row_groups(self) -> torch.Tensor:
        return torch.arange(self.out_features, device=self.codebooks.device) // self.rows_per_group

    def stored_weight(self) -> torch.Tensor:
        """The dense weight in stored row order, `[out, in]`, float32, differentiable in codebooks and scales."""
        codes = self.unpacked_codes()
        vectors = self.codebooks[self.row_groups().unsqueeze(1), codes]  # [out, in/d, d]
        weight = vectors.reshape(self.out_features, self.in_features)
        if self.scales is not None:
            weight = weight * self.scales.unsqueeze(1)
        if self.column_indices is not None:
            weight = weight.index_copy(1, self.column_indices.to(torch.int64), self.column_weights)
        return weight

    def coded_mask(self) -> torch.Tensor:
        """`[in_features]` float: 1 where the codes decide the weight, 0 on kept columns."""
        mask = torch.ones(self.in_features, device=self.codebooks.device)
        if self.column_indices is not None:
            mask[self.column_indices.to(torch.int64)] = 0.0
        return mask

    def dequantize(self) -> torch.Tensor:
        weight = self.stored_weight()
        if self.permutation is None:
            return weight
        return weight[self.inverse_permutation()]

    def stored_order(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight [out, ...]` in original row order, rearranged into stored row order (itself without a
        permutation)."""
        return weight if self.permutation is None else weight[self.permutation.to(torch.int64)]

    def inverse_permutation(self) -> torch.Tensor:
        order = self.permutation.to(torch.int64)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return inverse

    def encode(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Nearest entry for every vector of `weight` (original row order) in its row's codebook, with the row scales
        kept; where `mask` is given, only vectors holding at least one true element change. Kept columns keep their
        weights and do not count in the distance."""
        weight = self.stored_order(weight.detach().float())
        mask = None if mask is None else self.stored_order(mask)
        if self.scales is not None:
            scales = self.scales.detach().unsqueeze(1)
            weight = torch.where(scales != 0, weight / torch.where(scales != 0, scales, 1.0), 0.0)
        vectors = weight.reshape(self.out_features, self.vectors_per_row, self.vector_dim)
        groups = self.row_groups().unsqueeze(1).expand(-1, self.vectors_per_row)
        codebooks = self.codebooks.detach().float()
        coded = self.coded_mask().view(1, self.vectors_per_row, self.vector_dim).expand_as(vectors)
        distance_weights = None if self.column_indices is None else coded
        if mask is None:
            flat = None if distance_weights is None else distance_weights.reshape(-1, self.vector_dim)
            codes = nearest_entries(vectors.reshape(-1, self.vector_dim), codebooks, groups.reshape(-1), flat)
            self.set_codes(codes.view(self.out_features, self.vectors_per_row))
            return
        chosen = mask.reshape(self.out_features, self.vectors_per_row, self.vector_dim).any(dim=2)
        rows, columns = chosen.nonzero(as_tuple=True)
        codes = self.unpacked_codes().clone()
        chosen_weights = None if distance_weights is None else distance_weights[rows, columns]
        codes[rows, columns] = nearest_entries(vectors[rows, columns], codebooks, groups[rows, columns], chosen_weights)
        self.set_codes(codes)
