"""The fused RMS norm: the operator equals Llama's RMSNorm for every shape; `fuse_norms` replaces exactly the norms
that compute what Llama's does, keeps their weights and keys, and leaves training and other dtypes to the formula."""

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from compress.runtime import kernels
from compress.runtime.norms import FusedRMSNorm, fuse_norms
from tests.conftest import build_model


def llama_norm(width: int, eps: float = 1e-5) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(width, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(1)))
    return norm


@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 7, 64), (512, 96), (3, 2, 5, 33), (0, 64)])
def test_the_operator_equals_llamas_norm(shape):
    norm = llama_norm(shape[-1], eps=1e-6)
    x = 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    expected = norm(x)
    op = kernels.rms_norm_op()
    torch.testing.assert_close(op(x, norm.weight.detach(), norm.variance_epsilon), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernels.rms_norm_reference(x, norm.weight, 1e-6), expected, rtol=1e-5, atol=1e-6)
    if x.dim() == 3 and x.shape[1] > 1:  # a strided view is read as it is
        view = x.transpose(0, 1)
        torch.testing.assert_close(op(view, norm.weight.detach(), 1e-6), norm(view), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels.enabled(), reason="the compiled operators are not built")
def test_the_compiled_operator_is_used_and_not_the_reference():
    fused = FusedRMSNorm(llama_norm(64))
    assert fused.op is torch.ops.compress.rms_norm.default


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fusing_keeps_the_model_and_its_outputs(family):
    model = build_model(family).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(ids).logits
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert fuse_norms(model) == len(norms) == 2 * model.config.num_hidden_layers + 1
    assert all(isinstance(m, FusedRMSNorm) for m in model.modules() if "norm" in type(m).__name__.lower())
    assert list(model.state_dict()) == keys
    fused = model.model.layers[0].input_layernorm
    assert fused.weight is norms[0].weight  # the same parameter, not a copy
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert fuse_norms(model) == 0  # nothing left to fuse


def test_gradients_and_other_dtypes_take_llamas_formula():
    norm = llama_norm(64)
    fused = FusedRMSNorm(norm)  # shares norm's weight
    x = torch.randn(2, 5, 64)
    grads = []
    for module in (fused, norm):
        leaf = x.clone().requires_grad_()
        norm.weight.grad = None
        module(leaf).square().sum().backward()
        grads.append((leaf.grad, norm.weight.grad))
    torch.testing.assert_close(grads[0], grads[1])
    half = x.bfloat16()
    norm.bfloat16()
    assert torch.equal(fused(half), norm(half))  # bitwise: the same operators in the same order


def test_other_norms_and_hooked_norms_are_left_alone():
    class OnePlusWeightNorm(nn.Module):  # Gemma's kind: `(1 + weight)`, not Llama's computation
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (1 + self.weight) * h

    model = nn.Sequential(OnePlusWeightNorm(), llama_norm(8), llama_norm(8))
    model[2].register_forward_hook(lambda *_: None)
    assert fuse_norms(model) == 1
    assert [type(m).__name__ for m in model] == ["OnePlusWeightNorm", "FusedRMSNorm", "LlamaRMSNorm"]
