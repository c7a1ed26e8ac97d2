"""Where the pruning groups of each architecture family lie, and how a block is resized.

`Decoder`: Llama, Qwen2, Mistral and other decoders with `self_attn.{q,k,v,o}_proj` and
`mlp.{gate,up,down}_proj`. `Encoder`: BERT-style encoders (`attention.self.{query,key,value}`,
`attention.output.dense`, `intermediate.dense`, `output.dense`). A block's sizes are read from its layers' shapes,
so a pruned model describes itself."""

from __future__ import annotations

import torch
from torch import nn

from compress.prune.groups import GroupFamily, Member


def _linear(block: nn.Module, name: str) -> nn.Module | None:
    try:
        module = block.get_submodule(name)
    except AttributeError:
        return None
    return module if hasattr(module, "in_features") and hasattr(module, "out_features") else None


def _members(prefix: str, block: nn.Module, spec: list[tuple[str, int, torch.Tensor]]) -> tuple[Member, ...]:
    """Weight members `(layer, dim, index)`, plus the layer's bias when the group spans its rows."""
    members = []
    for name, dim, index in spec:
        members.append(Member(f"{prefix}.{name}", "weight", dim, index))
        if dim == 0 and getattr(block.get_submodule(name), "bias", None) is not None:
            members.append(Member(f"{prefix}.{name}", "bias", 0, index))
    return tuple(members)


class Decoder:
    name = "decoder"
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    def matches(self, block: nn.Module) -> bool:
        return all(_linear(block, n) is not None for n in self.attention + self.mlp) and hasattr(
            block.self_attn, "head_dim"
        )

    def sizes(self, block: nn.Module) -> dict[str, int]:
        attention, head_dim = block.self_attn, block.self_attn.head_dim
        return {
            "intermediate_size": block.mlp.gate_proj.out_features,
            "num_attention_heads": attention.q_proj.out_features // head_dim,
            "num_key_value_heads": attention.k_proj.out_features // head_dim,
        }

    def config_sizes(self, config) -> dict[str, int]:
        return {k: getattr(config, k) for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads")}

    def families(self, block: nn.Module, prefix: str, kinds: list[str], head_groups: str) -> list[GroupFamily]:
        sizes, head_dim = self.sizes(block), block.self_attn.head_dim
        families = []
        if "mlp_channels" in kinds:
            channels = torch.arange(sizes["intermediate_size"]).unsqueeze(1)
            spec = [("mlp.gate_proj", 0, channels), ("mlp.up_proj", 0, channels), ("mlp.down_proj", 1, channels)]
            families.append(GroupFamily("mlp_channels", prefix, _members(prefix, block, spec)))
        if "attention_heads" in kinds:
            heads, kv_heads = sizes["num_attention_heads"], sizes["num_key_value_heads"]
            per_kv = heads // kv_heads
            query = torch.arange(heads * head_dim)
            if head_groups == "kv" or per_kv == 1:  # a KV head with the query heads that read it
                query = query.view(kv_heads, per_kv * head_dim)
                kv = torch.arange(kv_heads * head_dim).view(kv_heads, head_dim)
                spec = [("self_attn.q_proj", 0, query), ("self_attn.k_proj", 0, kv), ("self_attn.v_proj", 0, kv),
                        ("self_attn.o_proj", 1, query)]  # fmt: skip
            else:  # the j-th query head of every KV head: each layer keeps as many query heads per KV head
                query = query.view(kv_heads, per_kv, head_dim).transpose(0, 1).reshape(per_kv, kv_heads * head_dim)
                spec = [("self_attn.q_proj", 0, query), ("self_attn.o_proj", 1, query)]
            families.append(GroupFamily("attention_heads", prefix, _members(prefix, block, spec)))
        return families

    def shapes(self, block: nn.Module, sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
        hidden, head_dim = block.self_attn.q_proj.in_features, block.self_attn.head_dim
        query, kv = sizes["num_attention_heads"] * head_dim, sizes["num_key_value_heads"] * head_dim
        intermediate = sizes["intermediate_size"]
        return {
            "self_attn.q_proj": (query, hidden),
            "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, query),
            "mlp.gate_proj": (intermediate, hidden),
            "mlp.up_proj": (intermediate, hidden),
            "mlp.down_proj": (hidden, intermediate),
        }

    def size_problem(self, sizes: dict[str, int]) -> str | None:
        if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
            return "num_attention_heads must be a multiple of num_key_value_heads"
        return None

    def update_attributes(self, block: nn.Module) -> None:
        sizes = self.sizes(block)
        block.self_attn.num_key_value_groups = sizes["num_attention_heads"] // sizes["num_key_value_heads"]

    def write_config(self, config, sizes: dict[str, int], block: nn.Module) -> bool:
        config.head_dim = block.self_attn.head_dim  # kept explicit: it no longer follows from hidden / heads
        for key, value in sizes.items():
            setattr(config, key, value)
        return True


class Encoder:
    name = "encoder"
    attention = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    mlp = ("intermediate.dense", "output.dense")

    def matches(self, block: nn.Module) -> bool:
        return all(_linear(block, n) is not None for n in self.attention + self.mlp) and hasattr(
            block.attention.self, "attention_head_size"
        )

    def sizes(self, block: nn.Module) -> dict[str, int]:
        attention = block.attention.self
        return {
            "intermediate_size": block.intermediate.dense.out_features,
            "num_attention_heads": attention.query.out_features // attention.attention_head_size,
        }

    def config_sizes(self, config) -> dict[str, int]:
        return {k: getattr(config, k) for k in ("intermediate_size", "num_attention_heads")}

    def families(self, block: nn.Module, prefix: str, kinds: list[str], head_groups: str) -> list[GroupFamily]:
        sizes, head_dim = self.sizes(block), block.attention.self.attention_head_size
        families = []
        if "mlp_channels" in kinds:
            channels = torch.arange(sizes["intermediate_size"]).unsqueeze(1)
            spec = [("intermediate.dense", 0, channels), ("output.dense", 1, channels)]
            families.append(GroupFamily("mlp_channels", prefix, _members(prefix, block, spec)))
        if "attention_heads" in kinds:
            heads = torch.arange(sizes["num_attention_heads"] * head_dim).view(-1, head_dim)
            spec = [("attention.self.query", 0, heads), ("attention.self.key", 0, heads),
                    ("attention.self.value", 0, heads), ("attention.output.dense", 1, heads)]  # fmt: skip
            families.append(GroupFamily("attention_heads", prefix, _members(prefix, block, spec)))
        return families

    def shapes(self, block: nn.Module, sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
        hidden, head_dim = block.attention.self.query.in_features, block.attention.self.attention_head_size
        heads, intermediate = sizes["num_attention_heads"] * head_dim, sizes["intermediate_size"]
        return {
            "attention.self.query": (heads, hidden),
            "attention.self.key": (heads, hidden),
            "attention.self.value": (heads, hidden),
            "attention.output.dense": (hidden, heads),
            "intermediate.dense": (intermediate, hidden),
            "output.dense": (hidden, intermediate),
        }

    def size_problem(self, sizes: dict[str, int]) -> str | None:
        return None

    def update_attributes(self, block: nn.Module) -> None:
        attention = block.attention.self
        attention.num_attention_heads = self.sizes(block)["num_attention_heads"]
        attention.all_head_size = attention.num_attention_heads * attention.attention_head_size

    def write_config(self, config, sizes: dict[str, int], block: nn.Module) -> bool:
        """A stock BERT config derives the head size from hidden_size / num_attention_heads, so fewer heads
        cannot be expressed in it; fewer intermediate channels can."""
        if sizes["num_attention_heads"] != config.num_attention_heads:
            return False
        config.intermediate_size = sizes["intermediate_size"]
        return True


ARCHITECTURES = (Decoder(), Encoder())
