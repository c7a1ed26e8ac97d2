"""`rtn`: asymmetric round-to-nearest per group, the baseline every other stage must beat."""

from __future__ import annotations

from pydantic import Field
from tqdm.auto import tqdm

from compress.errors import CompressError
from compress.formats.uniform import UniformLinear
from compress.models import dense_weight, replace_module
from compress.registry import register_stage
from compress.stages.base import (
    LayerSelection,
    blocks_with_linears,
    check_finite,
    group_size_problems,
    relative_error,
)


class RtnConfig(LayerSelection):
    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(128, ge=1, description="input weights per scale; null for one scale per row")


@register_stage("rtn", RtnConfig, quantizes=True, check=group_size_problems)
def apply(model, config: RtnConfig, context) -> None:
    for _, linears in tqdm(list(blocks_with_linears(model, config)), desc="rtn", unit="block"):
        for name, linear in linears.items():
            weight = dense_weight(linear)
            check_finite(weight, f"rtn: layer {name} weight")
            group_size = config.group_size or weight.shape[1]
            if weight.shape[1] % group_size:
                raise CompressError(
                    f"rtn: group_size {group_size} does not divide layer {name}'s {weight.shape[1]} input features"
                )
            quantized = UniformLinear.from_weight(weight, linear.bias, config.bits, group_size)
            context.record_layer(name, quantized, relative_error(weight, quantized.dequantize()))
            replace_module(model, name, quantized)
