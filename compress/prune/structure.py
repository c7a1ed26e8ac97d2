"""A model's prunable structure: its groups, the physical removal of zeroed groups, and the per-block sizes a
checkpoint records when blocks differ (see docs/FORMAT.md, `structure`)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.models import find_blocks, replace_module
from compress.prune.architectures import ARCHITECTURES
from compress.prune.groups import GroupFamily

log = logging.getLogger(__name__)


def architecture_of(model: nn.Module):
    """`(blocks prefix, blocks, architecture)`, or None when no known family matches the model's blocks."""
    try:
        prefix, blocks = find_blocks(model)
    except CompressError:
        return None
    for architecture in ARCHITECTURES:
        if all(architecture.matches(block) for block in blocks):
            return prefix, blocks, architecture
    return None


def find_groups(model: nn.Module, kinds: list[str], head_groups: str = "kv") -> list[GroupFamily]:
    """Every group family of the asked `kinds`, block by block. The layers must be dense `nn.Linear`s."""
    found = architecture_of(model)
    if found is None:
        raise CompressError(
            f"no pruning groups are known for {type(model).__name__}: supported are decoders with "
            "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj (Llama, Qwen2, Mistral) and BERT-style encoders"
        )
    prefix, blocks, architecture = found
    families = []
    for index, block in enumerate(blocks):
        families += architecture.families(block, f"{prefix}.{index}", kinds, head_groups)
    for family in families:
        for member in family.members:
            if type(model.get_submodule(member.module)) is not nn.Linear:
                raise CompressError(
                    f"layer {member.module} is {type(model.get_submodule(member.module)).__name__}, not a dense "
                    "nn.Linear: prune before quantizing"
                )
    return families


@torch.no_grad()
def remove_groups(model: nn.Module, families: list[GroupFamily], pruned: list[torch.Tensor]) -> None:
    """Remove the groups marked in `pruned` (one boolean `[G]` per family) from the layers; kept rows and
    columns stay in their order. The blocks' attributes (heads per KV head, head counts) follow the new shapes."""
    removed: dict[tuple[str, int], list[torch.Tensor]] = {}
    for family, mask in zip(families, pruned, strict=True):
        for member in family.members:
            if member.parameter == "weight" and mask.any():
                removed.setdefault((member.module, member.dim), []).append(member.index[mask].flatten())
    for name in dict.fromkeys(module for module, _ in removed):
        old = model.get_submodule(name)
        keep = []
        for dim in (0, 1):
            mask = torch.ones(old.weight.shape[dim], dtype=torch.bool)
            for positions in removed.get((name, dim), []):
                mask[positions] = False
            keep.append(mask.nonzero().squeeze(1))
        new = nn.Linear(len(keep[1]), len(keep[0]), bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)  # fmt: skip
        new.weight.copy_(old.weight[keep[0]][:, keep[1]])
        if old.bias is not None:
            new.bias.copy_(old.bias[keep[0]])
        new.requires_grad_(old.weight.requires_grad)
        replace_module(model, name, new)
    _, blocks, architecture = architecture_of(model)
    for block in blocks:
        architecture.update_attributes(block)


def block_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """`{block name: sizes}` read from the layers' shapes (empty for a model of no known family)."""
    found = architecture_of(model)
    if found is None:
        return {}
    prefix, blocks, architecture = found
    return {f"{prefix}.{i}": architecture.sizes(block) for i, block in enumerate(blocks)}


def express_in_config(model: nn.Module) -> bool:
    """When every block has the same sizes and the stock config can say them, write them into `model.config`
    (then the model is a stock transformers model). Returns whether the config now describes the model."""
    found = architecture_of(model)
    if found is None:
        return True
    _, blocks, architecture = found
    sizes = [architecture.sizes(block) for block in blocks]
    if any(s != sizes[0] for s in sizes):
        return False
    if sizes[0] == architecture.config_sizes(model.config):
        return True
    return architecture.write_config(model.config, sizes[0], blocks[0])


def structure_record(model: nn.Module) -> dict[str, dict[str, int]] | None:
    """The per-block sizes a checkpoint must record, or None when the config implies them all."""
    found = architecture_of(model)
    if found is None:
        return None
    _, _, architecture = found
    sizes = block_sizes(model)
    expected = architecture.config_sizes(model.config)
    return sizes if any(s != expected for s in sizes.values()) else None


def apply_structure(model: nn.Module, structure: Any, where: str) -> None:
    """Resize the blocks of a model built from its config (on the meta device, before weights load) to the sizes
    of a checkpoint's `structure` record. `where` names the checkpoint in errors."""
    found = architecture_of(model)
    if not isinstance(structure, dict) or found is None:
        raise CompressError(f"{where}: quantization_config.structure must map block names to sizes, for a model "
                            "with known pruning groups")  # fmt: skip
    prefix, blocks, architecture = found
    names = {f"{prefix}.{i}": block for i, block in enumerate(blocks)}
    for name, sizes in structure.items():
        if name not in names:
            raise CompressError(f"{where}: quantization_config.structure names block {name!r}, which the model "
                                f"does not have (its blocks are {prefix}.0 to {prefix}.{len(blocks) - 1})")  # fmt: skip
        block = names[name]
        expected = architecture.sizes(block)
        if not isinstance(sizes, dict) or set(sizes) != set(expected):
            raise CompressError(f"{where}: quantization_config.structure.{name} must have exactly the keys "
                                f"{sorted(expected)}, got {sizes!r}")  # fmt: skip
        bad = {k: v for k, v in sizes.items() if type(v) is not int or not 1 <= v <= expected[k]}
        if bad:
            raise CompressError(f"{where}: quantization_config.structure.{name}: {bad} must be whole numbers from 1 "
                                f"to the config's {expected}")  # fmt: skip
        problem = architecture.size_problem(sizes)
        if problem:
            raise CompressError(f"{where}: quantization_config.structure.{name}: {problem} ({sizes})")
        for relative, (out_features, in_features) in architecture.shapes(block, sizes).items():
            old = block.get_submodule(relative)
            new = nn.Linear(in_features, out_features, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)  # fmt: skip
            replace_module(block, relative, new)
        architecture.update_attributes(block)
