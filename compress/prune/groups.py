"""Pruning groups: sets of weight entries that are zeroed together and then removed together.

A group is "zero-invariant": once all its entries are zero, the structure it spans (an MLP channel, an attention
head) contributes exactly nothing to the block's output, so removing it changes no logit. A `GroupFamily` holds
the `G` groups of one kind in one block; each `Member` says where they lie in one tensor: `index[g]` are the
positions of group `g` along dimension `dim` of `module.parameter` (rows of a weight are dim 0, columns dim 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("mlp_channels", "attention_heads")


@dataclass(frozen=True)
class Member:
    module: str  # full name of the linear layer
    parameter: str  # "weight" or "bias"
    dim: int
    index: torch.Tensor  # int64 [G, m]: the m positions of each group along `dim`


@dataclass(frozen=True)
class GroupFamily:
    """The groups of one kind in one block, all of the same shape."""

    kind: str
    block: str  # full name of the block
    members: tuple[Member, ...]

    @property
    def count(self) -> int:
        return int(self.members[0].index.shape[0])


def member_tensor(model: nn.Module, member: Member) -> torch.Tensor:
    return getattr(model.get_submodule(member.module), member.parameter)


def gather(model: nn.Module, family: GroupFamily, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Every entry of every group as one row per group, `[G, entries per group]` (float32).

    `tensors` maps `module.parameter` to a tensor of the parameter's shape (a gradient, an optimizer moment);
    without it the parameters themselves are read."""
    rows = []
    for member in family.members:
        name = f"{member.module}.{member.parameter}"
        tensor = tensors[name] if tensors is not None else member_tensor(model, member)
        picked = tensor.detach().index_select(member.dim, member.index.flatten()).float()
        picked = picked.movedim(member.dim, 0).reshape(family.count, -1)
        rows.append(picked)
    return torch.cat(rows, dim=1)


@torch.no_grad()
def scale_groups(model: nn.Module, family: GroupFamily, groups: torch.Tensor, factor: float) -> None:
    """Multiply the entries of `groups` (int64 ids) by `factor` in place; 0 sets them to exactly zero."""
    if len(groups) == 0:
        return
    for member in family.members:
        tensor = member_tensor(model, member)
        positions = member.index[groups].flatten()
        if factor == 0.0:
            tensor.index_fill_(member.dim, positions, 0.0)
        else:
            tensor.index_copy_(member.dim, positions, tensor.index_select(member.dim, positions) * factor)


@torch.no_grad()
def read_groups(model: nn.Module, family: GroupFamily, groups: torch.Tensor) -> list[torch.Tensor]:
    """The entries of `groups`, one tensor per member (to be written back with `write_groups`)."""
    return [member_tensor(model, m).index_select(m.dim, m.index[groups].flatten()) for m in family.members]


@torch.no_grad()
def write_groups(model: nn.Module, family: GroupFamily, groups: torch.Tensor, values: list[torch.Tensor]) -> None:
    for member, value in zip(family.members, values, strict=True):
        member_tensor(model, member).index_copy_(member.dim, member.index[groups].flatten(), value)


def zero_groups(model: nn.Module, family: GroupFamily) -> torch.Tensor:
    """Boolean `[G]`: the groups whose entries are all exactly zero."""
    return gather(model, family).eq(0).all(dim=1)
