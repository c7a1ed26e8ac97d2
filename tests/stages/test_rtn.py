import pytest
import torch

from compress.errors import CompressError
from compress.formats.uniform import UniformLinear
from compress.stages.rtn import RtnConfig, apply
from tests.conftest import build_model


class Recorder:
    def __init__(self):
        self.layers = {}

    def record_layer(self, name, module, relative_error):
        self.layers[name] = relative_error


def logits_sqnr(reference, model, ids):
    with torch.no_grad():
        ref, out = reference(input_ids=ids).logits, model(input_ids=ids).logits
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_replaces_every_block_linear_and_keeps_quality(family):
    reference, model = build_model(family), build_model(family)
    context = Recorder()
    apply(model, RtnConfig(bits=4, group_size=32), context)
    quantized = [n for n, m in model.named_modules() if isinstance(m, UniformLinear)]
    assert len(quantized) == len(context.layers) > 0
    assert not any("lm_head" in n or "embed" in n for n in quantized)
    ids = torch.randint(3, 320, (2, 32))
    # A 4-bit grid alone gives about 20 dB of weight SQNR; the outliers of the tiny model widen the groups and the
    # error compounds over blocks. 10 dB (logit error a tenth of the logit energy) catches a broken grid or packing.
    assert logits_sqnr(reference, model, ids) > 10


def test_fewer_bits_cost_more():
    reference = build_model("llama")
    ids = torch.randint(3, 320, (2, 32))
    sqnr = {}
    for bits in (2, 3, 4, 8):
        model = build_model("llama")
        apply(model, RtnConfig(bits=bits, group_size=32), Recorder())
        sqnr[bits] = logits_sqnr(reference, model, ids)
    assert sqnr[2] < sqnr[3] < sqnr[4] < sqnr[8]
    assert sqnr[8] - sqnr[4] > 4 * 4  # each bit halves the step: about 6 dB per bit, 4 dB allows for clipping


def test_per_channel_and_ignore():
    model = build_model("llama")
    context = Recorder()
    apply(model, RtnConfig(bits=4, group_size=None, ignore=["down_proj"]), context)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, UniformLinear) and q_proj.group_size == 64
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_ignore_matches_full_layer_names():
    """`ignore` is matched against full names in the stage as in `compress validate`: a pattern anchored at the
    model's root leaves exactly that block's layers alone (it was once matched against names inside the block)."""
    model = build_model("llama")
    apply(model, RtnConfig(bits=4, group_size=32, ignore=[r"^model\.layers\.0\.", r"\.mlp\.up_proj$"]), Recorder())
    first, second = model.model.layers
    assert all(type(m) is torch.nn.Linear for m in first.modules() if m.__class__.__name__.endswith("Linear"))
    assert isinstance(second.self_attn.q_proj, UniformLinear) and isinstance(second.mlp.down_proj, UniformLinear)
    assert type(second.mlp.up_proj) is torch.nn.Linear


def test_group_size_must_divide_the_row():
    with pytest.raises(CompressError, match="group_size 48 does not divide layer model.layers.0.*64"):
        apply(build_model("llama"), RtnConfig(bits=4, group_size=48), Recorder())
