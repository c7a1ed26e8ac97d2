"""The decode forward of Llama's attention (compress/runtime/attention.py): for one new token it gives what
transformers' SDPA path gives, and for anything else it is transformers' own forward; only classes with Llama's
attention source are changed, and only for the transformers sources it was checked against."""

import copy

import pytest
import torch
from transformers import DynamicCache

from compress.runtime import attention
from compress.runtime.attention import fuse_attention
from tests.conftest import build_model

pytestmark = pytest.mark.skipif(not attention.supported(), reason="another transformers: nothing is fused")


def _attentions(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_decode_is_unchanged(family):
    model = build_model(family)
    fused = copy.deepcopy(model)
    keys, classes = list(model.state_dict()), [type(m) for m in _attentions(model)]
    count = fuse_attention(fused)
    if family == "llama":
        assert count == model.config.num_hidden_layers
    assert list(fused.state_dict()) == keys
    assert all(isinstance(m, cls) for m, cls in zip(_attentions(fused), classes, strict=True))
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for batch in (ids[:1], ids):  # batch 2 without padding: no mask at decode either
            want = model.generate(batch, max_new_tokens=12, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)  # fmt: skip
            got = fused.generate(batch, max_new_tokens=12, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)  # fmt: skip
            assert torch.equal(got.sequences, want.sequences)
            torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)


def test_decode_steps_take_the_fused_forward_and_the_rest_transformers(monkeypatch):
    model = build_model("llama")
    assert fuse_attention(model) == model.config.num_hidden_layers
    parent = type(_attentions(model)[0]).__mro__[1]
    calls = []
    original = parent.forward
    monkeypatch.setattr(parent, "forward", lambda self, *a, **k: calls.append(a[0].shape[1]) or original(self, *a, **k))
    ids = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=5, do_sample=False)
    layers = model.config.num_hidden_layers
    assert calls == [7] * layers  # the prompt through transformers; the 4 decode steps never
    calls.clear()
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)  # gradients recorded: transformers' forward throughout
    model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert calls == [7] * layers + [1] * layers


def test_a_padded_batch_keeps_its_mask_through_transformers():
    model = build_model("llama")
    fused = copy.deepcopy(model)
    fuse_attention(fused)
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        got = fused.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_other_sources_fuse_nothing(monkeypatch):
    model = build_model("llama")
    monkeypatch.setattr(attention, "_verdict", None)
    monkeypatch.setitem(attention.CHECKED, "sdpa_attention_forward", "0" * 16)
    assert fuse_attention(model) == 0
    assert not any(type(m).__name__.startswith("Decode") for m in model.modules())
    monkeypatch.setattr(attention, "_verdict", None)  # the real verdict again for the other tests
