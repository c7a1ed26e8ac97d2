"""What stages share: which layers they touch, and the per-layer record they leave in the report."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from compress.errors import NumericError
from compress.models import LINEAR_TYPES, dense_weight, find_blocks, find_linears


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as the recipe's own fields: no coercion


class LayerSelection(StageConfig):
    """Linear layers inside the transformer blocks whose class is in `targets` and whose full name matches no
    `ignore` regex. Embeddings and the output head live outside the blocks and are never selected."""

    targets: list[str] = Field(
        default_factory=lambda: list(LINEAR_TYPES), min_length=1, description="class names of the layers to compress"
    )
    ignore: list[str] = Field(default_factory=list, description="regexes of full layer names to leave alone")

    @field_validator("ignore")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        check_regexes(patterns)
        return patterns


def check_regexes(patterns) -> None:
    """Raise ValueError naming the first of `patterns` that is not a valid regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from error


def selected_layers(model: nn.Module, selection: LayerSelection) -> dict[str, tuple[int, int]]:
    """`{full name: (out_features, in_features)}` of the layers `selection` picks (works on a meta skeleton)."""
    return {
        name: tuple(dense_weight(linear).shape)
        for _, linears in blocks_with_linears(model, selection)
        for name, linear in linears.items()
    }


def block_linears(block: nn.Module, name: str, selection: LayerSelection) -> dict[str, nn.Module]:
    """The linears of block `name` that `selection` picks, keyed by their name inside the block; `ignore` is matched
    against full names (`name` + "." + the name inside), as in `selected_layers`."""
    found = find_linears(block, selection.targets, selection.ignore, prefix=name)
    return {full[len(name) + 1 :]: linear for full, linear in found.items()}


def group_size_problems(config, layers: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    """A `check` for stages with a `group_size`: it must divide the input features of every selected layer."""
    group_size = getattr(config, "group_size", None)
    if not group_size:
        return []
    misfits = {name: shape[1] for name, shape in layers.items() if shape[1] % group_size}
    if not misfits:
        return []
    shown = ", ".join(f"{name} ({features})" for name, features in list(misfits.items())[:3])
    more = f" and {len(misfits) - 3} more" if len(misfits) > 3 else ""
    return [("group_size", f"{group_size} does not divide the input features of {shown}{more}")]


def blocks_with_linears(model: nn.Module, selection: LayerSelection) -> Iterator[tuple[int, dict[str, nn.Module]]]:
    """For each block in order: its index and the selected linears by full name."""
    prefix, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        yield index, find_linears(block, selection.targets, selection.ignore, prefix=f"{prefix}.{index}")


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """||reference - approximation||^2 / ||reference||^2."""
    reference = reference.float()
    error = (reference - approximation.float()).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30)
    return float(error)


def check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NumericError(f"{where}: NaN or infinity found; the stage stopped and nothing was written")
