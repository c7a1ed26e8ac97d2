"""Per-layer accounting of a checkpoint, read from its config and safetensors header (no tensor is loaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from compress.eval import directory_size, weights_size
from compress.export import check_checkpoint
from compress.integrity import DTYPE_BYTES, stored_tensors

SHAPE_KEYS = ("format", "in_features", "out_features")


def inspect_checkpoint(path: Path, *, verify: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    check_checkpoint(path, verify=verify)
    config = json.loads((path / "config.json").read_text())
    layers = (config.get("quantization_config") or {}).get("layers", {})
    report_path = path / "report.json"
    recorded = json.loads(report_path.read_text()).get("layers", {}) if report_path.is_file() else {}
    stored = _tensor_bits(path)
    rows = []
    total_bits = 0
    total_weights = 0
    for name, settings in sorted(layers.items(), key=lambda item: natural_key(item[0])):
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
                "relative_error": error,
            }
        )
    totals = {
        "layers": len(rows),
        "weights": total_weights,
        "bits_per_weight": total_bits / total_weights if total_weights else 0.0,
        "checkpoint_bytes": weights_size(path),
        "directory_bytes": directory_size(path),
    }
    return rows, totals


def natural_key(name: str) -> tuple:
    """`model.layers.2.x` before `model.layers.10.x`: numbers compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _tensor_bits(path: Path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """`{tensor: (stored bits, shape)}` from the safetensors headers of the checkpoint in `path`."""
    header = stored_tensors(path)
    return {name: (math.prod(shape) * 8 * DTYPE_BYTES[dtype], shape) for name, (dtype, shape) in header.items()}
