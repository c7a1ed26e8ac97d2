"""The model's RMS norms at inference: one operator call each (`compress::rms_norm`, compress/runtime/kernels.py).

Llama's RMSNorm runs six operators per call, and a decoder layer calls two norms per token; at batch-1 decode on a
small model their dispatch costs more than the arithmetic (about a millisecond per token of the embedded model's
61 norms). `fuse_norms(model)` replaces each norm module that computes exactly what Llama's does (the same
bytecode: Mistral, Qwen2 and 3, Phi-3, Granite, SmolLM3, Mixtral and the other copies transformers generates from
it; not Gemma's `1 + weight`) by `FusedRMSNorm`, which holds the same weight parameter (state_dict keys, ties and
`save_pretrained` are unchanged) and calls the operator when no gradient is recorded and everything is float32 on
the CPU, and Llama's formula otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.runtime import kernels


def _computes_like_llama(cls: type) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forward, reference = getattr(cls, "forward", None), LlamaRMSNorm.forward.__code__
    code = getattr(forward, "__code__", None)
    return code is not None and all(
        getattr(code, field) == getattr(reference, field) for field in ("co_code", "co_consts", "co_names")
    )


class FusedRMSNorm(nn.Module):
    """Llama's RMSNorm, `weight * (x / sqrt(mean(x**2) + eps))` computed in float32, in one operator call."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.op = kernels.rms_norm_op()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.dtype is torch.float32 and weight.dtype is torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):  # fmt: skip
            return self.op(x, weight, self.variance_epsilon)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def fuse_norms(model: nn.Module) -> int:
    """Replace every Llama-like RMSNorm of `model` by a `FusedRMSNorm` of the same weight; returns how many. Norms
    with hooks (accelerate's device placement, forward hooks) are left as they are."""
    count = 0
    verdicts: dict[type, bool] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None or isinstance(child, FusedRMSNorm):
                continue
            cls = type(child)
            if cls not in verdicts:
                verdicts[cls] = _computes_like_llama(cls)
            hooked = child._forward_hooks or child._forward_pre_hooks or hasattr(child, "_hf_hook")
            if verdicts[cls] and not hooked:
                parent._modules[name] = FusedRMSNorm(child)
                count += 1
    return count
