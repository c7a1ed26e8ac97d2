"""Run a block-local stage (rtn, nupes, jlcm) one transformer block at a time.

Each block is compressed in place; when the stage calibrates, the block's outputs (computed by the block as the
stage left it) become the next block's inputs. Two optional companions make the same loop resumable and able to
handle a model larger than memory:

- a `RunState` (compress/run_state.py) checkpoints every finished block and the calibration inputs of the next
  one, so a killed run continues at the first unfinished block and ends with the same bytes;
- a `Streamer` (compress/streaming.py) brings each block's weights in from the safetensors shards just before
  its turn and writes the compressed block out right after, so only one block is ever held.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.calib import BlockInputs, capture_first_block_inputs
from compress.models import find_blocks
from compress.registry import StageEntry


class Streamer(Protocol):
    def load(self, index: int) -> None: ...

    def finish(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]: ...

    def start(self, streams: dict[str, list[torch.Tensor]]) -> None: ...


def run_stage(
    model: nn.Module,
    entry: StageEntry,
    config,
    context,
    *,
    stage_index: int = 0,
    state=None,
    streamer: Streamer | None = None,
) -> None:
    """Apply the block-local stage `entry` to every block of `model` in order (see the module docstring).

    With `state`, blocks a previous run finished are restored (in memory) or skipped (streaming) instead of redone.
    """
    prefix, blocks = find_blocks(model)
    done = state.blocks_done(stage_index) if state is not None else 0
    for index in range(done):
        state.restore_block(model, stage_index, index, context, tensors=streamer is None)
    batch = entry.calibration_batch(config)
    inputs = None
    offload = getattr(context, "offload", None)
    saved = state.streams(stage_index, offload) if state is not None and done else {}
    if batch and done < len(blocks):
        inputs = capture_first_block_inputs(model, context.calibration_windows, batch, offload)
        if done:
            inputs = BlockInputs(saved.pop("calibration"), inputs.args, inputs.kwargs)
    if streamer is not None:
        streamer.start(saved)
    progress = tqdm(total=len(blocks), initial=done, desc=entry.name, unit="block")
    for index in range(done, len(blocks)):
        name = f"{prefix}.{index}"
        if streamer is not None:
            streamer.load(index)
        figures = entry.block(blocks[index], index, name, inputs, config, context)
        if figures:
            progress.set_postfix(figures)
        streams: dict[str, list[torch.Tensor]] = {}
        if inputs is not None and index + 1 < len(blocks):
            inputs = BlockInputs(inputs.run(blocks[index]), inputs.args, inputs.kwargs)
            streams["calibration"] = inputs.hidden
        if streamer is not None:
            tensors, more = streamer.finish(index)
            streams.update(more)
        else:
            tensors = {key: value.detach() for key, value in blocks[index].state_dict().items()}
        if state is not None:
            layers = {k: v for k, v in context.layers.items() if k.startswith(name + ".")}
            metadata = streamer.shard_metadata(index) if streamer is not None else None
            state.save_block(stage_index, index, tensors, layers, streams, metadata)
        progress.update()
    progress.close()
