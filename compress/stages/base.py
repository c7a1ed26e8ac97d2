"""What stages share: which layers they touch, and the per-layer record they leave in the report."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress.errors import NumericError
from compress.models import LINEAR_TYPES, find_blocks, find_linears


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerSelection(StageConfig):
    """Linear layers inside the transformer blocks whose class is in `targets` and whose full name matches no
    `ignore` regex. Embeddings and the output head live outside the blocks and are never selected."""

    targets: list[str] = Field(default_factory=lambda: list(LINEAR_TYPES))
    ignore: list[str] = Field(default_factory=list)


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
