"""The model's attention at batch-1 decode, without transformers' per-call Python.

At one new token a small model's attention does little arithmetic, and transformers wraps it in several layers of
Python per call (a deprecation wrapper, the attention-function registry, `sdpa_attention_forward`'s checks, the
rotary embedding as a module of its own from the kernel hub): on the embedded model that is about a third of what a
token costs once the linear layers are compressed. `fuse_attention(model)` gives each attention module whose
forward is Llama's (the same source: Llama, and the copies transformers generates from it without changes) a
forward that, for one new token with no mask, runs the same tensor operations as transformers' SDPA path directly
(the projections, the rotary embedding with `rotate_half` made one `roll`, the cache's `update`, one
`scaled_dot_product_attention`, the output projection), and calls Llama's forward itself for anything else (many
tokens, a mask, another attention implementation, gradients, another dtype or device).

The fused forward was written against the sources whose hashes are in `CHECKED`; with other sources of those
functions (another transformers version) nothing is fused, so a change there can never change results.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

# sha256 (first 16 hex digits) of the sources the fused forward reproduces, as `inspect.getsource` gives them
CHECKED = {
    "LlamaAttention.forward": "e080b5cc468cd0a5",
    "apply_rotary_pos_emb": "ea234325c15de475",
    "rotate_half": "f714a4b1160c694e",
    "sdpa_attention_forward": "9be3d6b1f79abc00",
    "use_gqa_in_sdpa": "25bcff32ef323d00",
}


def _unwrapped(function):
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def _source_hash(function) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(_unwrapped(function)).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def _rotary_function(modeling):
    """The plain function behind `apply_rotary_pos_emb` (the kernel hub wraps it in a module of its own)."""
    rotary = modeling.apply_rotary_pos_emb
    if isinstance(rotary, nn.Module):
        return inspect.getclosurevars(type(rotary).forward).nonlocals.get("func")
    return rotary


def sources() -> dict[str, str | None]:
    """The hashes of the installed transformers' sources that `CHECKED` pins."""
    from transformers.integrations import sdpa_attention
    from transformers.models.llama import modeling_llama

    return {
        "LlamaAttention.forward": _source_hash(modeling_llama.LlamaAttention.forward),
        "apply_rotary_pos_emb": _source_hash(_rotary_function(modeling_llama)),
        "rotate_half": _source_hash(modeling_llama.rotate_half),
        "sdpa_attention_forward": _source_hash(sdpa_attention.sdpa_attention_forward),
        "use_gqa_in_sdpa": _source_hash(sdpa_attention.use_gqa_in_sdpa),
    }


_verdict: bool | None = None


def supported() -> bool:
    """Whether the installed transformers' sources are those the fused forward was checked against."""
    global _verdict
    if _verdict is None:
        try:
            _verdict = sources() == CHECKED
        except Exception:  # noqa: BLE001 - another layout of transformers: nothing is fused
            _verdict = False
        if not _verdict:
            log.info("runtime: attention not fused (transformers' attention sources differ from those checked)")
    return _verdict


def _decode_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """One new token of Llama's attention through SDPA: the same operations as transformers' path for that case."""
    original = type(self).__mro__[1].forward
    if (attention_mask is not None or cache is None or position_embeddings is None or hidden_states.dim() != 3
            or hidden_states.shape[1] != 1 or hidden_states.dtype is not torch.float32
            or hidden_states.device.type != "cpu" or self.training or torch.is_grad_enabled()
            or self.config._attn_implementation != "sdpa" or "past_key_values" in kwargs
            or kwargs.get("output_attentions") or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None):  # fmt: skip
        return original(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    batch, head_dim = hidden_states.shape[0], self.head_dim
    query = self.q_proj(hidden_states).view(batch, 1, -1, head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(batch, 1, -1, head_dim).transpose(1, 2)
    value = self.v_proj(hidden_states).view(batch, 1, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # rotate_half(x) = cat(-x2, x1) = roll(x, half) with the first half negated: the negation moves onto sin
    half = head_dim // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    query = query * cos + query.roll(half, dims=-1) * signed
    key = key * cos + key.roll(half, dims=-1) * signed
    key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    gqa = self.num_key_value_groups > 1 and (os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1"
                                             or key.shape[-1] == value.shape[-1] <= 256)  # fmt: skip
    output = F.scaled_dot_product_attention(query, key, value, None, 0.0, False, scale=self.scaling, enable_gqa=gqa)
    output = output.transpose(1, 2).reshape(batch, 1, -1)
    return self.o_proj(output), None


_FUSED: dict[type, type] = {}


def fuse_attention(model: nn.Module) -> int:
    """Give every attention module of `model` whose class computes Llama's attention (the same forward source) the
    decode forward above, by a subclass of its own class (parameters, keys and `isinstance` unchanged); returns how
    many. Modules with hooks are left as they are."""
    if not supported():
        return 0
    from transformers.models.llama.modeling_llama import LlamaAttention

    reference = _source_hash(LlamaAttention.forward)
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls in _FUSED.values() or module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            continue
        if not (hasattr(cls, "forward") and hasattr(module, "q_proj") and hasattr(module, "layer_idx")):
            continue
        if _source_hash(cls.forward) != reference or not _llama_source(cls):
            continue
        if cls not in _FUSED:
            _FUSED[cls] = type(f"Decode{cls.__name__}", (cls,), {"forward": _decode_forward, "__module__": __name__})
        module.__class__ = _FUSED[cls]
        count += 1
    return count


def _llama_source(cls: type) -> bool:
    """The class's module uses Llama's rotary embedding (a copied class with another `apply_rotary_pos_emb`, e.g.
    an interleaved one, keeps its own forward)."""
    import sys

    module = sys.modules.get(cls.__module__)
    rotary = getattr(module, "apply_rotary_pos_emb", None)
    if rotary is None:
        return False
    function = _rotary_function(module) if isinstance(rotary, nn.Module) else rotary
    return _source_hash(function) == CHECKED["apply_rotary_pos_emb"] and (
        _source_hash(getattr(module, "rotate_half", None)) == CHECKED["rotate_half"]
    )
