"""Checkpoint integrity: the sha256 of every file (recorded in report.json), and the safetensors header checked
against what the config says the model holds, before any tensor is allocated."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError

REPORT_FILE = "report.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint: which shard holds each tensor
MAX_HEADER_BYTES = 16 * 2**20  # a header of tens of thousands of tensors takes a few MiB
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
TORCH_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                torch.bool: "BOOL"}  # fmt: skip


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {bytes, sha256}}` of every file in `directory` but report.json (which holds this record)."""
    return {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() != REPORT_FILE
    }


def verify_files(directory: Path) -> None:
    """Refuse a checkpoint whose files differ from the sizes and sha256 recorded in its report.json."""
    where = f"checkpoint {str(directory)!r}"
    report_path = directory / REPORT_FILE
    if not report_path.is_file():
        raise CompressError(
            f"{where}: no {REPORT_FILE}, so its files cannot be verified (pass verify=False / --no-verify to load it "
            "unverified)"
        )
    try:
        files = json.loads(report_path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CompressError(f"{where}: {REPORT_FILE} has no readable record of the files ({error})") from error
    for name, record in files.items():
        path = directory / name
        if not isinstance(record, dict) or not {"bytes", "sha256"} <= set(record):
            raise CompressError(f"{where}: {REPORT_FILE} has a malformed record for {name!r}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CompressError(f"{where}: {REPORT_FILE} names a file outside the checkpoint ({name!r})")
        if not path.is_file():
            raise CompressError(f"{where}: {name} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            state = "truncated" if size < record["bytes"] else "longer than written"
            raise CompressError(f"{where}: {name} is {state} ({size} bytes, {record['bytes']} were written)")
        if sha256(path) != record["sha256"]:
            raise CompressError(f"{where}: {name} was altered (its sha256 differs from the one recorded at export)")


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{tensor: (dtype, shape)}` from a safetensors header, after checking that the header is well formed and
    that the tensors' byte ranges tile the file exactly (a truncated or padded file is refused)."""
    where = f"{path}"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CompressError(f"{where}: too short to be a safetensors file ({size} bytes)")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > MAX_HEADER_BYTES:
            raise CompressError(f"{where}: a header of {header_bytes} bytes is larger than the "
                                f"{MAX_HEADER_BYTES // 2**20} MiB compress accepts")  # fmt: skip
        if header_bytes > size - 8:
            raise CompressError(f"{where}: header size {header_bytes} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(handle.read(header_bytes).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CompressError(f"{where}: the header is not valid JSON ({error})") from error
        except RecursionError as error:
            raise CompressError(f"{where}: the header is nested too deeply to be a safetensors header") from error
    if not isinstance(header, dict):
        raise CompressError(f"{where}: the header is not a JSON object")
    metadata_problem = _metadata_problem(header.pop("__metadata__", {}))
    if metadata_problem:
        raise CompressError(f"{where}: __metadata__ {metadata_problem}")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    ranges = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
            valid = valid and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise CompressError(f"{where}: tensor {name!r} has a malformed header entry {entry!r}")
        if end - start != DTYPE_BYTES[dtype] * _numel(shape):
            raise CompressError(f"{where}: tensor {name!r} spans {end - start} bytes but {dtype}{list(shape)} needs "
                                f"{DTYPE_BYTES[dtype] * _numel(shape)}")  # fmt: skip
        tensors[name] = (dtype, shape)
        ranges.append((start, end, name))
    position = 0
    for start, end, name in sorted(ranges):
        if start != position:
            raise CompressError(f"{where}: tensor {name!r} does not start where the previous one ends")
        position = end
    data_bytes = size - 8 - header_bytes
    if position != data_bytes:
        state = "truncated" if data_bytes < position else "longer than its tensors"
        raise CompressError(f"{where}: the file is {state} ({data_bytes} data bytes, the header describes {position})")
    return tensors


def _metadata_problem(metadata: Any) -> str | None:
    """What is wrong with a header's `__metadata__` (string keys and values; a format version this compress reads)."""
    from compress.hf import QUANT_METHOD, READABLE_VERSIONS

    strings = isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    if not strings:
        return "must map strings to strings"
    if metadata.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
        return f"names quant_method {metadata['quant_method'][:100]!r}, not {QUANT_METHOD!r}"
    version = metadata.get("format_version")
    if version is not None and version not in {str(v) for v in READABLE_VERSIONS}:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        return f"has format_version {version[:100]!r}; this compress reads {readable}"
    return None


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: `model.safetensors`, or the shards its index lists (in order)."""
    where = f"checkpoint {str(directory)!r}"
    index = directory / INDEX_FILE
    if not index.is_file():
        if not (directory / WEIGHTS_FILE).is_file():
            raise CompressError(f"{where}: {WEIGHTS_FILE} is missing")
        return [directory / WEIGHTS_FILE]
    weight_map = _weight_map(index)
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts or not (directory / name).is_file():
            raise CompressError(f"{where}: {INDEX_FILE} lists the shard {name!r}, which is missing")
    return [directory / name for name in files]


def stored_tensors(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{tensor: (dtype, shape)}` over every weight file of the checkpoint, each header checked as
    `read_safetensors_header` does; for shards, each tensor must be in the shard the index names, and only once."""
    files = weight_files(directory)
    if len(files) == 1 and files[0].name == WEIGHTS_FILE:
        return read_safetensors_header(files[0])
    weight_map = _weight_map(directory / INDEX_FILE)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            if weight_map.get(name) != path.name or name in tensors:
                raise CompressError(f"{path}: holds tensor {name!r}, which {INDEX_FILE} places in "
                                    f"{weight_map.get(name)!r}")  # fmt: skip
            tensors[name] = entry
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CompressError(f"checkpoint {str(directory)!r}: {INDEX_FILE} lists tensors no shard holds: {missing[:5]}")
    return tensors


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CompressError(f"{index}: not a readable shard index ({error})") from error
    return weight_map


def expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[str, tuple[int, ...]]], set[str]]:
    """What a checkpoint of `model` (a meta skeleton is enough) must hold: `{name: (dtype, shape)}` with floats
    stored as F16, and the names that are tied to an earlier one (written once, under the first name)."""
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    tied: set[str] = set()
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
            continue
        seen.add(id(tensor))
        dtype = "F16" if tensor.is_floating_point() else TORCH_DTYPES.get(tensor.dtype, str(tensor.dtype))
        expected[name] = (dtype, tuple(tensor.shape))
    return expected, tied


def tensor_problems(
    stored: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple[str, tuple[int, ...]]], tied: set[str]
) -> list[str]:
    problems = []
    for name, (dtype, shape) in expected.items():
        if name not in stored:
            problems.append(f"{name} is missing")
        elif stored[name][1] != shape:
            problems.append(f"{name} has shape {list(stored[name][1])}, the config makes it {list(shape)}")
        elif stored[name][0] != dtype:
            problems.append(f"{name} is stored as {stored[name][0]}, the format stores {dtype}")
    problems += [f"{name} is not part of the model" for name in stored if name not in expected and name not in tied]
    return problems


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
