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
