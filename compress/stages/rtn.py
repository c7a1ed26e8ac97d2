"""`rtn`: asymmetric round-to-nearest per group, the baseline every other stage must beat."""

from __future__ import annotations

from pydantic import Field

from compress.errors import CompressError
from compress.formats.uniform import UniformLinear
from compress.models import dense_weight, replace_module
from compress.registry import STAGES, register_block_stage
from compress.stages.base import LayerSelection, block_linears, check_finite, group_size_problems, relative_error


class RtnConfig(LayerSelection):
    bits: int = Field(4, ge=2, le=8, description="bits per weight of the codes")
    group_size: int | None = Field(64, ge=1, description="input weights per scale; null for one scale per row")


@register_block_stage("rtn", RtnConfig, calibration_batch=lambda config: None, quantizes=True,
                      check=group_size_problems)  # fmt: skip
def compress_block(block, index: int, name: str, inputs, config: RtnConfig, context) -> None:
    for relative, linear in block_linears(block, name, config).items():
        full = f"{name}.{relative}"
        weight = dense_weight(linear)
        check_finite(weight, f"rtn: layer {full} weight")
        group_size = config.group_size or weight.shape[1]
        if weight.shape[1] % group_size:
            raise CompressError(
                f"rtn: group_size {group_size} does not divide layer {full}'s {weight.shape[1]} input features"
            )
        quantized = UniformLinear.from_weight(weight, linear.bias, config.bits, group_size)
        context.record_layer(full, quantized, relative_error(weight, quantized.dequantize()))
        replace_module(block, relative, quantized)


apply = STAGES["rtn"].apply  # the whole model, block by block
