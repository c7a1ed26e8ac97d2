"""What every compressed-weight format offers: the interface stages and PV-tuning work through."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.formats.packing import unpack_bits


class QuantizedLinear(nn.Module):
    """An `nn.Linear` replacement holding integer codes and continuous parameters.

    Subclasses set `format` (through `register_format`), keep their settings as typed attributes,
    and name their buffers and parameters exactly as they are stored in safetensors. Continuous
    parameters (scales, exponents, codebooks) are `nn.Parameter`s, integer codes are buffers.
    """

    format: str = ""
    in_features: int
    out_features: int
    cache_codes: bool = False  # set by fine-tuning, which dequantizes every step: keep unpacked codes between changes
    # Fine-tuning registers a zero `weight_probe` parameter of the dense weight's shape: the forward adds it, so
    # its gradient is the loss's gradient with respect to the dense weight (what code updates need), while the
    # continuous parameters still get their exact gradients through `dequantize()`. Removed before export.

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def unpacked(self, packed: torch.Tensor, num_bits: int, count: int) -> torch.Tensor:
        """`unpack_bits(packed, num_bits, count)` as int64; with `cache_codes`, unpacked once per change of `packed`
        (its version counter moves on every in-place write, loads included)."""
        if not self.cache_codes:
            return unpack_bits(packed, num_bits, count).to(torch.int64)
        key = (packed.data_ptr(), packed._version)
        if getattr(self, "_codes_key", None) != key:
            self._codes_cache = unpack_bits(packed, num_bits, count)
            self._codes_key = key
        return self._codes_cache.to(torch.int64)

    def settings(self) -> dict[str, Any]:
        """The per-layer settings written to `quantization_config.layers` (enough to rebuild the module)."""
        raise NotImplementedError

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, settings: dict[str, Any]) -> QuantizedLinear:
        """A module of the right shapes with unset contents, to be filled from a checkpoint."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The dense weight `[out_features, in_features]` in float32, differentiable in the continuous parameters."""
        raise NotImplementedError

    def encode(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Set the codes nearest to the dense `weight`, keeping the continuous parameters; only where `mask` is true."""
        raise NotImplementedError

    def bits_per_weight(self) -> float:
        """Stored bits of this layer (codes and every scale, zero, exponent, codebook) per weight; bias excluded."""
        stored = sum(t.numel() * _stored_bits(t) for name, t in self._stored_tensors() if name != "bias")
        return stored / (self.in_features * self.out_features)

    def _stored_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t) for n, t in self.state_dict().items()]

    @property
    def weight(self) -> torch.Tensor:
        """A dense view for code that reads `.weight` (dtype, device, shape, model initialisers). Never stored."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.__dict__.get("kernel")  # installed by compress.runtime.prepare, for inference only
        if kernel is not None and not torch.is_grad_enabled():
            return kernel(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.dequantize()
        probe = self._parameters.get("weight_probe")
        if probe is not None:
            weight = weight + probe
        return F.linear(x, weight.to(x.dtype), bias)

    def attach_probe(self) -> nn.Parameter:
        """Register and return the zero `weight_probe` (see above)."""
        probe = nn.Parameter(torch.zeros(self.out_features, self.in_features, device=self.scales_device()))
        self.register_parameter("weight_probe", probe)
        return probe

    def detach_probe(self) -> None:
        if "weight_probe" in self._parameters:
            del self._parameters["weight_probe"]

    def scales_device(self) -> torch.device:
        return next(iter(self.state_dict().values())).device

    def continuous_parameters(self) -> list[nn.Parameter]:
        """The format's learnable floating parameters (scales, exponents, codebooks), bias excluded."""
        return [p for name, p in self.named_parameters() if name not in ("bias", "weight_probe")]

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {options}"


def _stored_bits(tensor: torch.Tensor) -> int:
    """Bits per element on disk: floating tensors are written as float16, integer tensors as they are."""
    if tensor.is_floating_point():
        return 16
    return torch.iinfo(tensor.dtype).bits
