"""Hessian-aware rounding with error feedback (GPTQ, Frantar et al. 2022), for any column quantizer.

With `H = 2 X^T X` the Hessian of the layer's output error `||W X - W_q X||^2` in each row, columns are quantized
left to right; the error of column j, divided by the Cholesky factor `U_jj` of `H^-1`, is spread over the columns
not yet quantized (`W[:, j:] -= e_j U_{j, j:}`), lazily in blocks of `block_size` columns (paper, eq. 3-5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class HessianAccumulator:
    """Running `2 X^T X / n` of a linear layer's inputs, fed batch by batch (`add_batch`)."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.count = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        total = self.count + x.shape[0]
        self.hessian *= self.count / total
        self.hessian += (2.0 / total) * (x.T @ x)
        self.count = total


def damped_hessian(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`H + damping * mean(diag H) I` with dead inputs (zero diagonal) given a diagonal of 1, and their mask."""
    hessian = hessian.clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    identity = torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    hessian += damping * torch.mean(torch.diag(hessian)) * identity
    return hessian, dead


def damped_inverse_factor(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped `H^-1` (`damped_hessian`), and the mask of dead inputs."""
    hessian, dead = damped_hessian(hessian, damping)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True), dead


ColumnQuantizer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: ColumnQuantizer,
    damping: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """Integer codes `[out, in]` for `weight` given the input Hessian.

    `quantize_column(w, j)` maps column `j`'s current values `[out]` to `(codes [out], decoded [out])`.
    """

    def one_column(values: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes, decoded = quantize_column(values[:, 0], index)
        return codes, decoded.unsqueeze(1)

    return gptq_round_vectors(weight, hessian, one_column, 1, damping, block_size)


def gptq_round_vectors(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_vectors: ColumnQuantizer,
    vector_dim: int,
    damping: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """Codes `[out, in / vector_dim]` for `weight` when `vector_dim` consecutive columns are quantized together
    (vector quantization, as GPTVQ does). `quantize_vectors(w, j)` maps the current values `[out, vector_dim]` of
    columns `j .. j + vector_dim - 1` to `(codes [out], decoded [out, vector_dim])`. The decoded vector is then
    fixed, and its columns' errors are fed back one column at a time exactly as for scalars: the error of each
    column, updated by the errors before it, is spread over every column to its right."""
    factor, dead = damped_inverse_factor(hessian, damping)
    factor = factor.to(weight.dtype)
    work = weight.clone().float()
    work[:, dead] = 0
    columns = work.shape[1]
    if columns % vector_dim or block_size % vector_dim:
        raise ValueError(f"vector_dim {vector_dim} must divide the {columns} columns and the block size {block_size}")
    codes = torch.zeros(work.shape[0], columns // vector_dim, dtype=torch.int64)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = work[:, start:end].clone()
        errors = torch.zeros_like(block)
        inverse_block = factor[start:end, start:end]
        for first in range(0, end - start, vector_dim):
            vector_codes, decoded = quantize_vectors(block[:, first : first + vector_dim], start + first)
            codes[:, (start + first) // vector_dim] = vector_codes
            for k in range(vector_dim):
                i = first + k
                error = (block[:, i] - decoded[:, k]) / inverse_block[i, i]
                block[:, i:] -= error.unsqueeze(1) * inverse_block[i, i:].unsqueeze(0)
                errors[:, i] = error
        work[:, end:] -= errors @ factor[start:end, end:]
    return codes


def gptq_power_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    exponent: torch.Tensor,
    clip: torch.Tensor | float,
    bits: int,
    group_size: int,
    damping: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clips: torch.Tensor | None = None,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on the NUPES power grid as GPTQ does it with groups: each group's scale and zero are chosen when the
    sweep first reaches one of its columns, from the group's columns as the error feedback has left them (its
    min/max in the power domain, shrunk by `clip`), not from the original weights. With `act_order` the columns
    are swept in decreasing order of the Hessian's diagonal (the permutation is undone in the returned codes; the
    groups stay those of the stored layout, contiguous input columns).

    Returns codes `[out, in]` (int64), scales and zeros `[out, groups]`, and each weight's continuous position
    on the grid when it was rounded (`[out, in]`, in code units; its code is the nearest level in the weight
    domain): where learning may start from.

    With `clips` (candidate ratios), each row of a group takes the candidate whose nearest rounding of the
    group's current values has the least Hessian-diagonal-weighted error, instead of `clip`: the feedback can
    grow a group's extremes, and plain min/max would then coarsen its grid. With `grid` (scales and zeros
    `[out, groups]`), every group keeps that grid instead (chosen beforehand from the original weights: GPTQ
    without lazy group parameters)."""
    from compress.formats.power import nearest_codes, power

    out_features, columns = weight.shape
    if columns % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {columns} columns")
    block_size = max(block_size // group_size, 1) * group_size  # a group inside one block (natural order)
    order = torch.argsort(torch.diag(hessian), descending=True, stable=True) if act_order else torch.arange(columns)
    position_of = torch.argsort(order)  # position in the sweep of each original column
    factor, dead = damped_inverse_factor(hessian[order][:, order], damping)
    work = weight.float()[:, order].clone()
    work[:, dead] = 0
    groups = columns // group_size
    scales = torch.ones(out_features, groups) if grid is None else grid[0].float().clone()
    zeros = torch.zeros(out_features, groups, dtype=torch.int64) if grid is None else grid[1].clone()
    ready = torch.full((groups,), grid is not None, dtype=torch.bool)
    group_of = order // group_size
    codes = torch.zeros(out_features, columns, dtype=torch.int64)
    positions = torch.zeros(out_features, columns)
    exponent = exponent.reshape(-1).float()
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = work[:, start:end].clone()
        errors = torch.zeros_like(block)
        inverse_block = factor[start:end, start:end]
        for i in range(end - start):
            group = int(group_of[start + i])
            if not ready[group]:
                members = position_of[group * group_size : (group + 1) * group_size]
                values = work[:, members].clone()
                inside = (members >= start) & (members < end)
                values[:, inside] = block[:, members[inside] - start]
                group_scales, group_zeros = _group_grid(values, exponent, bits, clip, clips,
                                                        torch.diag(hessian)[order][members])  # fmt: skip
                scales[:, group], zeros[:, group] = group_scales[:, 0], group_zeros[:, 0]
                ready[group] = True
            column = block[:, i : i + 1]
            s, z = scales[:, group : group + 1], zeros[:, group : group + 1]
            column_codes, decoded = nearest_codes(column, s, z, exponent, bits, 1)
            codes[:, start + i] = column_codes[:, 0]
            positions[:, start + i] = (power(column, exponent) / s + z)[:, 0]
            error = (column[:, 0] - decoded[:, 0]) / inverse_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * inverse_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        work[:, end:] -= errors @ factor[start:end, end:]
    return codes[:, position_of], scales, zeros, positions[:, position_of]


def _group_grid(
    values: torch.Tensor,
    exponent: torch.Tensor,
    bits: int,
    clip: torch.Tensor | float,
    clips: torch.Tensor | None,
    importance: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's scales and zeros `[out, 1]` from its current `values [out, size]`: min/max shrunk by `clip`,
    or per row the best of `clips` by the `importance`-weighted error of nearest rounding."""
    from compress.formats.power import grid_params, nearest_codes, power

    transformed = power(values, exponent)
    size = values.shape[1]
    if clips is None:
        return grid_params(transformed, bits, size, clip)
    best_error = best_scales = best_zeros = None
    for ratio in clips.tolist():
        scales, zeros = grid_params(transformed, bits, size, ratio)
        _, decoded = nearest_codes(values, scales, zeros, exponent, bits, size)
        error = ((decoded - values).pow(2) * importance).sum(dim=1, keepdim=True)
        if best_error is None:
            best_error, best_scales, best_zeros = error, scales, zeros
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scales, best_zeros = torch.where(better, scales, best_scales), torch.where(better, zeros, best_zeros)
    return best_scales, best_zeros
