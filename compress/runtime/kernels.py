"""The operators of kernels.cpp, loaded once, each with its pure-PyTorch reference beside it (the fallback where
the library is not built, and what the tests hold the operators to)."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable

import torch

from compress.formats.grid import grouped
from compress.formats.packing import unpack_bits
from compress.runtime.build import LIBRARY, STAMP, identity

log = logging.getLogger(__name__)

SWITCH = "COMPRESS_KERNELS"  # "0": never use the compiled operators (debugging); the reference path runs instead


def enabled() -> bool:
    """Whether the compiled operators are switched on and loaded."""
    return os.environ.get(SWITCH, "1") != "0" and _load()


@functools.cache
def _load() -> bool:
    if not LIBRARY.is_file():
        log.warning("compress: the CPU kernels are not built (make setup, or python -m compress.runtime); "
                    "compressed layers run the slower pure-PyTorch path")  # fmt: skip
        return False
    try:
        built = json.loads(STAMP.read_text())
    except (OSError, json.JSONDecodeError):
        built = None
    if built != identity():
        log.warning("compress: the CPU kernels were built from another source or torch version; rebuild them with "
                    "python -m compress.runtime (the pure-PyTorch path runs meanwhile)")  # fmt: skip
        return False
    torch.ops.load_library(str(LIBRARY))
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes for torch.compile and meta tensors: each operator returns `[..., out_features]`."""

    @torch.library.register_fake("compress::grid_linear")
    def _(x, qweight, zeros, factors, table, bits, group_size, bias):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @torch.library.register_fake("compress::codebook_linear")
    def _(x, codes, codebooks, scales, permutation, column_indices, column_weights, code_bits, rows_per_group, bias):
        return x.new_empty(*x.shape[:-1], codes.shape[0])

    @torch.library.register_fake("compress::half_linear")
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("compress::rms_norm")
    def _(x, weight, eps):
        return x.new_empty(x.shape)  # contiguous, as the operator returns it

    @torch.library.register_fake("compress::grid_linear_group")
    def _(x, qweights, zeros, factors, tables, bits, group_size, biases):
        return [x.new_empty(*x.shape[:-1], qweight.shape[0]) for qweight in qweights]

    @torch.library.register_fake("compress::codebook_linear_group")
    def _(x, codes, codebooks, scales, permutations, column_indices, column_weights, code_bits, rows_per_group,
          biases):
        return [x.new_empty(*x.shape[:-1], layer.shape[0]) for layer in codes]


def grid_linear_op() -> Callable[..., torch.Tensor]:
    """`grid_linear(x, qweight, zeros, factors, table, bits, group_size, bias) -> y`: `x [..., in] @ W^T + bias` with
    `W[r, i] = factors[r, g] * table[r or 0, q[r, i] - zeros[r, g] + 2**bits - 1]`, `g` the group of input `i`;
    `qweight` packed codes (uint8 `[out, packed]`), `zeros` uint8 `[out * groups]`, `factors` float32
    `[out, groups]`, `table` float32 `[1 or out, at least 2**(bits + 1) - 1]` (the fastest path wants at least 32
    columns). The compiled operator where it is on, else the reference; chosen when called (once, at load)."""
    return torch.ops.compress.grid_linear.default if enabled() else grid_linear_reference


def grid_linear_group_op() -> Callable[..., list[torch.Tensor]]:
    """`grid_linear_group(x, qweights, zeros, factors, tables, bits, group_size, biases) -> [y]`: `grid_linear` of
    several layers of the same width and group size on the same input, each argument but `x` a list with one entry
    per layer (a bias may be None); one loop over all their rows at decode."""
    return torch.ops.compress.grid_linear_group.default if enabled() else grid_linear_group_reference


def codebook_linear_op() -> Callable[..., torch.Tensor]:
    """`codebook_linear(x, codes, codebooks, scales, permutation, column_indices, column_weights, code_bits,
    rows_per_group, bias) -> y`: `x [..., in] @ W^T + bias` for a `codebook` layer. Stored row `i` (of `codes`,
    packed uint8 `[out, packed]`) is the entries `codebooks[i // rows_per_group, codes[i, v]]` (float32
    `[G, K, d]`) of its vectors `v`, times `scales[i]` if given, with the input features `column_indices` (int64
    `[k]`) taken from `column_weights` (float32 `[out, k]`) instead; it is original row `permutation[i]` (int64
    `[out]`) if given."""
    return torch.ops.compress.codebook_linear.default if enabled() else codebook_linear_reference


def codebook_linear_group_op() -> Callable[..., list[torch.Tensor]]:
    """`codebook_linear_group(x, codes, codebooks, scales, permutations, column_indices, column_weights, code_bits,
    rows_per_group, biases) -> [y]`: `codebook_linear` of several layers of the same code width on the same input,
    each argument but `x` and `code_bits` a list with one entry per layer; one loop over all their rows at decode."""
    return torch.ops.compress.codebook_linear_group.default if enabled() else codebook_linear_group_reference


def half_linear_op() -> Callable[..., torch.Tensor]:
    """`half_linear(x, weight, bias) -> y`: `x [..., in] @ weight^T + bias` for a float16 `weight [out, in]`, in
    float32. Every operator takes float32 `x` of any leading shape and an optional float32 `bias` (or None)."""
    return torch.ops.compress.half_linear.default if enabled() else half_linear_reference


def rms_norm_op() -> Callable[..., torch.Tensor]:
    """`rms_norm(x, weight, eps) -> y`: `weight * x / sqrt(mean(x**2, -1) + eps)` for float32 `x [..., d]` and
    `weight [d]`, as Llama's RMSNorm computes it in float32 (no autograd: for inference)."""
    return torch.ops.compress.rms_norm.default if enabled() else rms_norm_reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight.t()
    return y if bias is None else y + bias


def half_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear(x, weight.float(), bias)


def grid_linear_reference(x, qweight, zeros, factors, table, bits: int, group_size: int, bias) -> torch.Tensor:
    out_features, in_features = qweight.shape[0], x.shape[-1]
    qmax = (1 << bits) - 1
    codes = unpack_bits(qweight, bits, in_features).to(torch.int64)
    index = grouped(codes, group_size) - zeros.to(torch.int64).view(out_features, -1, 1) + qmax
    levels = torch.gather(table.expand(out_features, -1), 1, index.reshape(out_features, in_features))
    weight = grouped(levels, group_size) * factors.view(out_features, -1, 1)
    return _linear(x, weight.reshape(out_features, in_features), bias)


def grid_linear_group_reference(x, qweights, zeros, factors, tables, bits: int, group_size: int, biases):
    return [grid_linear_reference(x, *layer, bits, group_size, bias)
            for *layer, bias in zip(qweights, zeros, factors, tables, biases, strict=True)]  # fmt: skip


def codebook_linear_reference(
    x, codes, codebooks, scales, permutation, column_indices, column_weights, code_bits: int, rows_per_group: int, bias
) -> torch.Tensor:
    out_features, in_features = codes.shape[0], x.shape[-1]
    dim = codebooks.shape[2]
    unpacked = unpack_bits(codes, code_bits, in_features // dim).to(torch.int64)
    groups = torch.arange(out_features, device=codes.device) // rows_per_group
    weight = codebooks[groups.unsqueeze(1), unpacked].reshape(out_features, in_features)
    if scales is not None:
        weight = weight * scales.unsqueeze(1)
    if column_indices is not None:
        weight = weight.index_copy(1, column_indices, column_weights)
    if permutation is not None:
        weight = torch.empty_like(weight).index_copy_(0, permutation, weight)
    return _linear(x, weight, bias)


def codebook_linear_group_reference(
    x, codes, codebooks, scales, permutations, column_indices, column_weights, code_bits: int, rows_per_group, biases
) -> list[torch.Tensor]:
    layers = zip(codes, codebooks, scales, permutations, column_indices, column_weights, rows_per_group, biases,
                 strict=True)  # fmt: skip
    return [codebook_linear_reference(x, c, b, s, p, i, w, code_bits, r, bias) for c, b, s, p, i, w, r, bias in layers]
