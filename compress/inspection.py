"""Per-layer accounting of a checkpoint, read from its config and safetensors header (no tensor is loaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open

from compress.errors import CompressError
from compress.eval import directory_size
from compress.export import WEIGHTS_FILE

SHAPE_KEYS = ("format", "in_features", "out_features")
DTYPE_BITS = {"F16": 16, "BF16": 16, "F32": 32, "F64": 64, "U8": 8, "I8": 8, "I16": 16, "I32": 32, "I64": 64, "BOOL": 8}


def inspect_checkpoint(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CompressError(f"checkpoint {str(path)!r}: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CompressError(f"checkpoint {str(path)!r}: config.json is not valid JSON ({error})") from error
    layers = (config.get("quantization_config") or {}).get("layers", {})
    report_path = path / "report.json"
    recorded = json.loads(report_path.read_text()).get("layers", {}) if report_path.is_file() else {}
    stored = _tensor_bits(path / WEIGHTS_FILE)
    rows = []
    total_bits = 0
    total_weights = 0
    for name, settings in layers.items():
        pieces = {k: v for k, v in stored.items() if k.startswith(name + ".") and k != f"{name}.bias"}
        bits = sum(bits for bits, _ in pieces.values())
        weights = int(settings.get("in_features", 0)) * int(settings.get("out_features", 0))
        total_bits += bits
        total_weights += weights
        error = recorded.get(name, {}).get("relative_error")
        rows.append(
            {
                "layer": name,
                "format": settings.get("format"),
                "settings": ", ".join(f"{k}={v}" for k, v in settings.items() if k not in SHAPE_KEYS),
                "bits_per_weight": bits / weights if weights else math.nan,
                "relative_error": "-" if error is None else f"{error:.3e}",
            }
        )
    totals = {
        "layers": len(rows),
        "weights": total_weights,
        "bits_per_weight": total_bits / total_weights if total_weights else 0.0,
        "checkpoint_bytes": directory_size(path),
    }
    return rows, totals


def _tensor_bits(path: Path) -> dict[str, tuple[int, list[int]]]:
    if not path.is_file():
        raise CompressError(f"checkpoint {str(path.parent)!r}: {path.name} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            result = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                shape = piece.get_shape()
                result[key] = (math.prod(shape) * DTYPE_BITS[piece.get_dtype()], shape)
            return result
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise CompressError(
            f"checkpoint {str(path.parent)!r}: {path.name} is not a readable safetensors file ({error})"
        ) from error
