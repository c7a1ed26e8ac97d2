"""Calibration activations on disk instead of in memory (`compress run --offload-activations`, or chosen by
`--max-memory` when they are what does not fit).

A block-local stage holds the hidden states entering the current block for every calibration batch, and the block's
outputs (the next block's inputs): `2 x samples x seq_len x hidden x 4` bytes, 8.6 GB for 128 windows of 2048 tokens
of a 8192-wide model. Offloaded, each batch is a file, read when a pass over the batches reaches it, so memory holds
one batch at a time. The files live in a scratch folder beside the output and are removed when the stage is done
with them.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}  # fmt: skip


class DiskTensors(Sequence[torch.Tensor]):
    """A list of tensors kept as one safetensors file each under a fresh folder in `root`; `[i]` reads item i back.
    The folder is removed with the object (or by `release()`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="activations-", dir=self.root))
        self._shapes: list[tuple[tuple[int, ...], torch.dtype]] = []
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.directory), True)

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        save_file({"tensor": tensor}, str(self._path(len(self._shapes))))
        self._shapes.append((tuple(tensor.shape), tensor.dtype))

    def extend(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.append(tensor)

    def like(self) -> DiskTensors:
        """An empty list of the same kind, beside this one."""
        return DiskTensors(self.root)

    def shape(self, index: int) -> tuple[tuple[int, ...], torch.dtype]:
        return self._shapes[index]

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        with safe_open(str(self._path(index % len(self))), "pt") as handle:
            return handle.get_tensor("tensor")

    def __len__(self) -> int:
        return len(self._shapes)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def release(self) -> None:
        self._finalizer()

    def _path(self, index: int) -> Path:
        return self.directory / f"{index:05d}.safetensors"


def empty_like(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | DiskTensors:
    """An empty list to collect results for `tensors`: on disk if they are."""
    return tensors.like() if isinstance(tensors, DiskTensors) else []


def save_incrementally(items: dict[str, Sequence[torch.Tensor]], path: Path, metadata: dict[str, str]) -> None:
    """One safetensors file of every tensor of `items`, named `{key}.{i}`, written one tensor at a time: tensors held
    by a `DiskTensors` are read and written in turn, so memory holds one of them, not all. The file is what
    `safetensors.save_file` would write for the same tensors, up to the order of the data."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    order, offset = [], 0
    for key, tensors in items.items():
        for index in range(len(tensors)):
            shape, dtype = tensors.shape(index) if isinstance(tensors, DiskTensors) else _shape(tensors[index])
            size = dtype.itemsize * math.prod(shape)
            header[f"{key}.{index}"] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                                        "data_offsets": [offset, offset + size]}  # fmt: skip
            order.append((tensors, index, size))
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensors, index, size in order:
            data = tensors[index].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if len(data) != size:
                raise RuntimeError(f"tensor {index} changed size while it was written")
            handle.write(data)


def _shape(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(tensor.shape), tensor.dtype
