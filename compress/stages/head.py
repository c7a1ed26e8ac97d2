"""`head`: the output head (and the input embedding tied to it) on a uniform grid, round-to-nearest per group.

At 2-3 bits per weight the float16 head of a small model is the largest tensor of the checkpoint and the largest
read per decoded token (SmolLM2-135M: 49152x576, 54 MiB). At 8 bits it halves, at 4 bits it quarters, and the
runtime computes it from its codes like every other compressed layer. A model whose embedding is tied to the head
keeps one matrix: the embedding then reads its rows from the head's codes (compress.formats.embedding), so the
checkpoint stores the matrix once, compressed (format version 5)."""

from __future__ import annotations

import logging

from pydantic import Field
from torch import nn

from compress.errors import CompressError
from compress.formats.embedding import QuantizedEmbedding
from compress.formats.uniform import UniformLinear
from compress.models import dense_weight
from compress.registry import register_stage
from compress.stages.base import StageConfig, check_finite, relative_error

log = logging.getLogger(__name__)


class HeadConfig(StageConfig):
    bits: int = Field(8, ge=4, le=8, description="bits per weight of the head's codes")
    group_size: int | None = Field(64, ge=1, description="input weights per scale; null for one scale per row")


def output_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The output head's module name and module; CompressError when the model has none or it is not a linear."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None:
        raise CompressError(f"head: model {type(model).__name__} has no output head (an encoder); remove the stage")
    if type(head) is not nn.Linear:
        raise CompressError(f"head: the output head is a {type(head).__name__}, not a linear layer (compressed "
                            "already, or a kind this stage does not know)")  # fmt: skip
    name = next(name for name, module in model.named_modules() if module is head)
    return name, head


@register_stage("head", HeadConfig)
def apply(model: nn.Module, config: HeadConfig, context) -> None:
    name, head = output_head(model)
    weight = dense_weight(head).float()
    check_finite(weight, f"head: layer {name} weight")
    group_size = config.group_size or weight.shape[1]
    if weight.shape[1] % group_size:
        raise CompressError(f"head: group_size {group_size} does not divide the head's {weight.shape[1]} input "
                            "features")  # fmt: skip
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embedding is not None and getattr(embedding, "weight", None) is head.weight
    quantized = UniformLinear.from_weight(weight, head.bias, config.bits, group_size).to(head.weight.dtype)
    context.record_layer(name, quantized, relative_error(weight, quantized.dequantize()))
    model.set_output_embeddings(quantized)
    if tied and type(embedding) is nn.Embedding:
        model.set_input_embeddings(QuantizedEmbedding(quantized, embedding.padding_idx))
    elif tied:  # an embedding of its own kind (e.g. scaled): it keeps the float matrix, untied from the head
        log.warning("head: the input embedding (%s) is tied to the head but is not a plain embedding; it keeps its "
                    "own float16 copy of the matrix", type(embedding).__name__)  # fmt: skip
        embedding.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if tied:
        untie(model)


def untie(model: nn.Module) -> None:
    """The config no longer ties the embedding to the head: the head is compressed, so no tensor is shared, and
    nothing may re-tie them (transformers re-ties on load and in `tie_weights`)."""
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False
    if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
        model.all_tied_weights_keys = {}

