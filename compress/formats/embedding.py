"""An input embedding served from the compressed output head it was tied to (format version 5).

A model whose embedding and output head share one matrix (`tie_word_embeddings`) stores that matrix once. When the
head is compressed, the embedding reads its rows from the head's codes: row `i` of the embedding is row `i` of the
head's dense weight, dequantized only for the token ids looked up. The module holds no tensor of its own, so the
checkpoint stores nothing for it; `quantization_config.embeddings` names the head it reads (docs/FORMAT.md)."""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError
from compress.formats.base import QuantizedLinear


class QuantizedEmbedding(nn.Module):
    """`nn.Embedding` over the rows of a compressed head (a format with `dequantize_rows`)."""

    def __init__(self, head: QuantizedLinear, padding_idx: int | None = None) -> None:
        super().__init__()
        if not hasattr(head, "dequantize_rows"):
            raise CompressError(f"an embedding cannot read its rows from a {head.format} layer (uniform layers only)")
        self.__dict__["head"] = head  # not a submodule: its tensors are stored once, under the head's own name
        self.num_embeddings = head.out_features
        self.embedding_dim = head.in_features
        self.padding_idx = padding_idx

    @property
    def head(self) -> QuantizedLinear:
        return self.__dict__["head"]

    @property
    def weight(self) -> torch.Tensor:
        """A dense view for code that reads `.weight` (dtype, device, shape). Never stored."""
        return self.head.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.dequantize_rows(ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim).to(self.head.scales.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the compressed head"


def shared_embeddings(model: nn.Module) -> dict[str, str]:
    """`{embedding module name: head module name}` of every embedding that reads a compressed head's rows."""
    names = {id(module): name for name, module in model.named_modules()}
    return {
        name: names[id(module.head)] for name, module in model.named_modules() if isinstance(module, QuantizedEmbedding)
    }


def install_shared_embeddings(model: nn.Module, embeddings: dict, where: str) -> None:
    """Replace each embedding `embeddings` names by one reading the rows of the compressed head it maps to (which
    must already be installed), checking names, kinds and shapes."""
    from compress.models import replace_module

    if not isinstance(embeddings, dict):
        raise CompressError(f"{where}: quantization_config.embeddings must map embedding names to head names")
    for name, head_name in embeddings.items():
        try:
            original, head = model.get_submodule(name), model.get_submodule(str(head_name))
        except AttributeError as error:
            raise CompressError(f"{where}: quantization_config.embeddings names {name!r} -> {head_name!r}, which the "
                                "model does not have") from error  # fmt: skip
        if not isinstance(original, (nn.Embedding, QuantizedEmbedding)):
            raise CompressError(f"{where}: quantization_config.embeddings names {name!r}, which is not an embedding")
        if not isinstance(head, QuantizedLinear) or not hasattr(head, "dequantize_rows"):
            raise CompressError(f"{where}: embedding {name!r} reads {head_name!r}, which is not a compressed layer "
                                "listed in quantization_config.layers with format uniform")  # fmt: skip
        if (original.num_embeddings, original.embedding_dim) != (head.out_features, head.in_features):
            raise CompressError(f"{where}: embedding {name!r} is {original.num_embeddings}x{original.embedding_dim} "
                                f"but the head {head_name!r} it reads is {head.out_features}x{head.in_features}")
        replace_module(model, name, QuantizedEmbedding(head, getattr(original, "padding_idx", None)))
