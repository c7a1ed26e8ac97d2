"""Choose the exponent and clipping of a power-domain grid (NUPES) by minimising a weighted reconstruction error.

The error `sum_ij importance_j (w_ij - w_q_ij)^2` is smooth and close to convex in the exponent and in the clip
ratio, so a coordinate search over two 1-D grids (exponent with the clip fixed, then clip with the exponent
fixed, twice) finds the optimum of the joint grid at a fraction of its cost. `importance` is the diagonal of
the input Hessian in data-driven mode (the output error of the layer, inputs treated as uncorrelated) and
all ones in data-free mode (plain weight error).
"""

from __future__ import annotations

import torch

from compress.formats.power import grid_params, nearest_codes, power


def row_errors(
    weight: torch.Tensor,
    exponent: torch.Tensor,
    clip: torch.Tensor | float,
    bits: int,
    group_size: int,
    importance: torch.Tensor | None,
) -> torch.Tensor:
    """Weighted squared error of each row `[out]` after nearest rounding on the clipped power grid."""
    exponent = exponent.half().float()
    scales, zeros = grid_params(power(weight, exponent), bits, group_size, clip)
    _, decoded = nearest_codes(weight, scales, zeros, exponent, bits, group_size)
    error = (decoded - weight).pow(2)
    if importance is not None:
        error = error * importance
    return error.sum(dim=1)


def search_exponent_and_clip(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    exponents: torch.Tensor,
    clips: torch.Tensor,
    per_channel: bool,
    importance: torch.Tensor | None = None,
    rounds: int = 2,
    sample_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best exponent (`[1]`, or `[out]` per channel) and clip ratio (`[1, 1]` or `[out, 1]`) for `weight [out, in]`.

    A per-layer search measures the error on `sample_rows` evenly spaced rows (all rows if fewer): one exponent
    for the layer is as well determined by a few hundred rows as by all of them, at a fraction of the cost."""
    weight = weight.float()
    if not per_channel and weight.shape[0] > sample_rows:
        weight = weight[torch.linspace(0, weight.shape[0] - 1, sample_rows).long()]
    rows = weight.shape[0] if per_channel else 1
    exponent = torch.ones(rows)
    clip = torch.ones(rows, 1)

    def best(candidates: torch.Tensor, settings: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        errors = torch.stack([row_errors(weight, a, c, bits, group_size, importance) for a, c in settings])
        if not per_channel:
            errors = errors.sum(dim=1, keepdim=True)
        return candidates[errors.argmin(dim=0)]

    for _ in range(rounds):
        exponent = best(exponents, [(torch.full((rows,), float(a)), clip) for a in exponents])
        clip = best(clips, [(exponent, torch.full((rows, 1), float(c))) for c in clips]).reshape(rows, 1)
    return exponent, clip
