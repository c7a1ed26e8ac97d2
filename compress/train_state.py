"""Checkpoints of a training stage's state, so a killed run resumes where it stopped: tensors in safetensors,
the rest in JSON, written to a temporary directory and renamed into place (a checkpoint is whole or absent). The
directory carries compress's ownership marker: one of that name without it is the user's and is refused, never
replaced or deleted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.errors import CompressError
from compress.ownership import fresh_path, make_owned, refuse_unowned, remove_owned

TENSORS = "state.safetensors"
META = "state.json"
KIND = "training checkpoint"


def training_directory(out: str | Path, stage: str) -> Path:
    """Where `stage` keeps its training checkpoints for the run writing `out`: `.<out>.<stage>/` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.{stage}"


def save_state(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    refuse_unowned(directory, KIND)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = make_owned(fresh_path(directory.parent, f"{directory.name}.partial-"), KIND)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary / TENSORS))
    (temporary / META).write_text(json.dumps(meta))
    previous = fresh_path(directory.parent, f"{directory.name}.previous-")
    if directory.exists():
        directory.rename(previous)
    temporary.rename(directory)
    remove_owned(previous, KIND)


def load_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint in `directory`, or None when there is none."""
    refuse_unowned(directory, KIND)
    if not (directory / META).is_file() or not (directory / TENSORS).is_file():
        return None
    try:
        return load_file(str(directory / TENSORS)), json.loads((directory / META).read_text())
    except (OSError, ValueError, json.JSONDecodeError) as error:
        message = f"training checkpoint {str(directory)!r} is damaged ({error}); remove it to start over"
        raise CompressError(message) from error


def optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat tensors `prefix.index.key`."""
    return {
        f"{prefix}.{index}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for index, state in optimizer.state_dict()["state"].items()
        for key, value in state.items()
    }


def restore_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    saved = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    saved["state"] = state
    optimizer.load_state_dict(saved)


def discard_state(directory: Path) -> None:
    remove_owned(directory, KIND)
