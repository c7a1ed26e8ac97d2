"""Block-by-block calibration: capture what enters the first transformer block, then push it through one
block at a time (compress/blockwise.py). Only one block's inputs are held at once, so memory does not grow with
depth."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.models import find_blocks
from compress.offload import DiskTensors, empty_like


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """The hidden states entering a block, per calibration batch, with the extra arguments the block takes
    (attention mask, position embeddings ...), which are the same for every block."""

    hidden: list[torch.Tensor] | DiskTensors  # on disk with `--offload-activations` (compress/offload.py)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    @torch.no_grad()
    def run(self, block: nn.Module, batches: Sequence[int] | None = None) -> list[torch.Tensor] | DiskTensors:
        """The block's output hidden states for every batch, or for `batches` in that order (on disk if the
        inputs are)."""
        outputs = empty_like(self.hidden)
        for index in range(len(self.hidden)) if batches is None else batches:
            outputs.append(_first(block(self.hidden[index], *self.args[index], **self.kwargs[index])))
        return outputs


class ByBatch(Mapping[int, torch.Tensor]):
    """Block outputs computed for some batches of a `BlockInputs`, looked up by batch number; outputs kept on
    disk stay there until looked up."""

    def __init__(self) -> None:
        self._where: dict[int, tuple[Sequence[torch.Tensor], int]] = {}

    def add(self, batches: Sequence[int], outputs: Sequence[torch.Tensor]) -> None:
        for position, batch in enumerate(batches):
            self._where[batch] = (outputs, position)

    def __getitem__(self, batch: int) -> torch.Tensor:
        outputs, position = self._where[batch]
        return outputs[position]

    def __iter__(self) -> Iterator[int]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def run_collecting(
    block: nn.Module, inputs: BlockInputs, linears: dict[str, nn.Module], collector,
    batches: Sequence[int] | None = None,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Run `block` on every batch of `inputs` (or on `batches`) while `collector(linear)` objects are fed each
    linear's input (their `add_batch(x)`). Returns the block's outputs and the collectors by linear name."""
    collectors = {name: collector(linear) for name, linear in linears.items()}
    hooks = [
        linear.register_forward_hook(lambda module, args, output, c=collectors[name]: c.add_batch(args[0]))
        for name, linear in linears.items()
    ]
    try:
        outputs = inputs.run(block, batches)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, collectors


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int, offload: Path | None = None
) -> BlockInputs:
    """Run the model on `windows` only up to its first block and keep that block's inputs (their hidden states in
    files under `offload` if given)."""
    _, blocks = find_blocks(model)
    captured = BlockInputs(hidden=DiskTensors(offload) if offload is not None else [])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.args.append(tuple(args[1:]))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured
