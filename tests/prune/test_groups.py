"""Pruning groups per architecture family: where they lie, and that each is zero-invariant (zeroing a whole
group changes the output exactly as silencing its structure does, i.e. zeroing the columns that read it)."""

import pytest
import torch

from compress.errors import CompressError
from compress.prune.groups import GroupFamily, Member, gather, scale_groups
from compress.prune.structure import find_groups
from tests.conftest import build_model, model_output

KINDS = ["mlp_channels", "attention_heads"]


pytestmark = pytest.mark.usefixtures("one_thread")


def only(family: GroupFamily, dims: set[int]) -> GroupFamily:
    return GroupFamily(family.kind, family.block, tuple(m for m in family.members if m.dim in dims))


def test_llama_gqa_groups_pair_each_kv_head_with_the_query_heads_that_read_it():
    model = build_model("llama")  # 4 query heads, 2 KV heads, head_dim 16
    mlp, heads = find_groups(model, KINDS, "kv")[:2]
    assert (mlp.kind, mlp.count, heads.kind, heads.count) == ("mlp_channels", 128, "attention_heads", 2)
    where = {(m.module.rsplit(".", 1)[1], m.dim): m.index for m in heads.members}
    assert torch.equal(where["q_proj", 0][1], torch.arange(32, 64))  # query heads 2 and 3 read KV head 1
    assert torch.equal(where["k_proj", 0][1], torch.arange(16, 32)) and torch.equal(where["o_proj", 1][1],
                                                                                   torch.arange(32, 64))  # fmt: skip
    query = find_groups(model, ["attention_heads"], "query")[0]
    assert query.count == 2 and {m.module.rsplit(".", 1)[1] for m in query.members} == {"q_proj", "o_proj"}
    assert torch.equal(query.members[0].index[1], torch.cat([torch.arange(16, 32), torch.arange(48, 64)]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "bert"])
@pytest.mark.parametrize("head_groups", ["kv", "query"])
def test_every_group_is_zero_invariant(family, head_groups):
    model = build_model(family)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = model_output(model, ids)
    families = find_groups(model, KINDS, head_groups)
    assert len(families) == 4 and sum(f.kind == "attention_heads" for f in families) == 2
    if family == "qwen2":  # q, k, v biases belong to the head groups
        assert any(m.parameter == "bias" for m in families[1].members)
    for family_ in families[:2]:
        for group in range(min(family_.count, 3)):
            silenced = []
            for dims in ({0, 1}, {1}):  # the whole group, or only the columns that read its structure
                saved = {k: v.clone() for k, v in model.state_dict().items()}
                scale_groups(model, only(family_, dims), torch.tensor([group]), 0.0)
                silenced.append(model_output(model, ids))
                model.load_state_dict(saved)
            assert torch.allclose(silenced[0], silenced[1], atol=1e-5, rtol=0)
            assert not torch.allclose(silenced[0], reference, atol=1e-5, rtol=0)  # the group did something
    assert torch.equal(model_output(model, ids), reference)


def test_gather_lays_out_each_group_as_one_row():
    model = build_model("llama")
    mlp = find_groups(model, ["mlp_channels"])[0]
    rows = gather(model, mlp)
    layer = model.model.layers[0].mlp
    assert rows.shape == (128, 3 * 64)
    assert torch.equal(rows[5], torch.cat([layer.gate_proj.weight[5], layer.up_proj.weight[5],
                                           layer.down_proj.weight[:, 5]]))  # fmt: skip
    assert isinstance(mlp.members[0], Member)


def test_unknown_architectures_and_quantized_layers_are_refused():
    with pytest.raises(CompressError, match="no pruning groups are known for GPT2LMHeadModel"):
        find_groups(build_model("gpt2"), KINDS)
    from compress.formats.uniform import UniformLinear
    from compress.models import replace_module

    model = build_model("llama")
    linear = model.model.layers[0].mlp.gate_proj
    replace_module(model, "model.layers.0.mlp.gate_proj", UniformLinear.from_weight(linear.weight, None, 4, 32))
    with pytest.raises(CompressError, match="model.layers.0.mlp.gate_proj is UniformLinear, not a dense nn.Linear"):
        find_groups(model, KINDS)
