"""Bit packing of integer codes into uint8 streams.

Layout (the checkpoint contract, see docs/FORMAT.md): along the last dimension, codes are taken
eight at a time (the row is zero-padded to a multiple of 8). Eight `b`-bit codes form one
`8*b`-bit little-endian word, code `i` in bits `[b*i, b*i + b)`; the word is written as `b`
bytes, least significant first. So a row of `n` codes takes `ceil(n / 8) * b` bytes, and every
width from 1 to 8 bits packs without wasted bits.
"""

from __future__ import annotations

import torch


def packed_length(count: int, num_bits: int) -> int:
    """Bytes taken by `count` codes of `num_bits` bits (one row)."""
    return -(-count // 8) * num_bits


def pack_bits(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack integer codes `[..., n]` with values in `[0, 2**num_bits)` into uint8 `[..., packed_length(n)]`."""
    _check_width(num_bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << num_bits):
        raise ValueError(f"codes out of range for {num_bits}-bit packing")
    *lead, count = codes.shape
    padded = -(-count // 8) * 8
    words = torch.zeros(*lead, padded, dtype=torch.int64, device=codes.device)
    words[..., :count] = codes.to(torch.int64)
    words = words.view(*lead, padded // 8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * num_bits
    value = (words << shifts).sum(dim=-1, keepdim=True)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(num_bits, device=codes.device, dtype=torch.int64) * 8
    packed = (value >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(*lead, padded // 8 * num_bits)


def unpack_bits(packed: torch.Tensor, num_bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 `[..., packed_length(count)]` -> uint8 codes `[..., count]`."""
    _check_width(num_bits)
    *lead, length = packed.shape
    if length != packed_length(count, num_bits):
        raise ValueError(f"packed row has {length} bytes, expected {packed_length(count, num_bits)}")
    groups = packed.to(torch.int64).view(*lead, length // num_bits, num_bits)
    byte_shifts = torch.arange(num_bits, device=packed.device, dtype=torch.int64) * 8
    value = (groups << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * num_bits
    codes = (value >> shifts) & ((1 << num_bits) - 1)
    return codes.reshape(*lead, -1)[..., :count].to(torch.uint8)


def _check_width(num_bits: int) -> None:
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in 1..8, got {num_bits}")
