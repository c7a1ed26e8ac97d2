"""Compress a model larger than memory, one block at a time.

The model is built as a skeleton without weights (accelerate's empty-weights init). Only the tensors outside the
transformer blocks (embeddings, final norm, output head) are read at the start. Each block's weights are read from
the safetensors shards just before its turn; once compressed, the block is written out as its own shard of the
checkpoint and its tensors are dropped. Peak memory is about one block, the embeddings and the activations.

Evaluation streams too: the evaluation windows' hidden states go through each original block and through the
same block compressed, and the final norm and head turn both streams into logits at the end.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compress.calib import capture_first_block_inputs
from compress.errors import CompressError
from compress.export import layer_settings, packed_state_dict, round_to_storage
from compress.hf import QUANT_METHOD, needed_version
from compress.integrity import INDEX_FILE, WEIGHTS_FILE
from compress.models import (
    ModelSource,
    check_weights_finite,
    find_blocks,
    load_config,
    load_tokenizer,
    unique_tensors,
)

log = logging.getLogger(__name__)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip


class ShardedWeights:
    """The tensors of a Hugging Face safetensors checkpoint (`model.safetensors`, or the shards of
    `model.safetensors.index.json`), read one at a time by the model's own tensor names."""

    def __init__(self, directory: Path, model: nn.Module) -> None:
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                stored = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise CompressError(f"model {str(directory)!r}: {INDEX_FILE} is not readable ({error})") from error
        elif (directory / WEIGHTS_FILE).is_file():
            with safe_open(str(directory / WEIGHTS_FILE), "pt") as handle:
                stored = dict.fromkeys(handle.keys(), WEIGHTS_FILE)
        else:
            raise CompressError(
                f"model {str(directory)!r}: streaming reads safetensors weights ({WEIGHTS_FILE} or {INDEX_FILE}), "
                "and the directory has neither"
            )
        self._headers: dict[Path, tuple[dict, int]] = {}
        base = getattr(model, "base_model_prefix", "")
        self.files: dict[str, str] = {}  # the model's tensor name -> (stored name, file)
        self.stored: dict[str, str] = {}
        missing = []
        for name in unique_tensors(model):
            candidates = [name, name.removeprefix(f"{base}."), f"{base}.{name}"] if base else [name]
            found = next((c for c in candidates if c in stored), None)
            if found is None:
                missing.append(name)
                continue
            self.stored[name], self.files[name] = found, stored[found]
        if missing:
            raise CompressError(
                f"model {str(directory)!r}: the safetensors weights lack {len(missing)} tensors of the model, "
                f"e.g. {missing[:3]}"
            )

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read with plain file reads into its own memory: a memory-mapped read would also count the
        file's pages in the process's resident memory while it copies."""
        path = self.directory / self.files[name]
        header, data_start = self._headers.get(path) or self._read_header(path)
        entry = header[self.stored[name]]
        start, end = entry["data_offsets"]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CompressError(f"{path}: tensor {self.stored[name]!r} has dtype {entry['dtype']}, which is not read")
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as handle:
            handle.seek(data_start + start)
            if handle.readinto(raw.numpy()) != end - start:
                raise CompressError(f"{path}: truncated inside tensor {self.stored[name]!r}")
        return raw.view(dtype).reshape(entry["shape"])

    def _read_header(self, path: Path) -> tuple[dict, int]:
        from compress.integrity import read_safetensors_header

        read_safetensors_header(path)  # checks the header and that the tensors tile the file
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        self._headers[path] = (header, 8 + length)
        return self._headers[path]


def open_streamed(source: ModelSource, *, trust_remote_code: bool = False) -> tuple[nn.Module, Any, str, Any]:
    """`(model, tokenizer, kind, weights)`: the model's skeleton with only the tensors outside its blocks loaded
    (as float32), and the reader that brings the blocks in."""
    from accelerate import init_empty_weights

    from compress.models import auto_class

    if source.gguf_file is not None:
        raise CompressError(
            f"model {source.name!r} is a GGUF file; streaming reads safetensors shards. Run without --stream (it "
            "fits in memory), or convert it with transformers' save_pretrained first"
        )
    directory = _local_directory(source)
    config, kind = load_config(source, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not stored
        model = auto_class(kind).from_config(config, trust_remote_code=trust_remote_code)
    model.eval()
    model.tie_weights()  # tied tensors are stored once, under their first name
    weights = ShardedWeights(directory, model)
    load_outside(model, weights)
    check_weights_finite(model, f"model {source.name!r}")
    tokenizer = load_tokenizer(source.location, source.gguf_file, trust_remote_code)
    return model, tokenizer, kind, weights


def load_outside(model: nn.Module, weights: ShardedWeights) -> None:
    """(Re)read every tensor outside the blocks as stored in the source (float32)."""
    prefix, _ = find_blocks(model)
    _load(model, weights, [name for name in weights.files if not name.startswith(prefix + ".")])
    model.tie_weights()


def _local_directory(source: ModelSource) -> Path:
    path = Path(source.location)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as error:  # the hub client raises many kinds (network, authentication, missing repository)
        raise CompressError(f"model {source.name!r} could not be fetched from the hub: {error}") from error


def _load(model: nn.Module, weights: ShardedWeights, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, "meta")  # the tensor it replaces goes first, not after
        tensor = weights.get(name)
        if tensor.is_floating_point():
            tensor = tensor.float()
        set_module_tensor_to_device(model, name, "cpu", value=tensor)


class BlockStreamer:
    """Brings block weights in before a block-local stage works on a block and writes the block out after
    (the `Streamer` of compress/blockwise.py). With an `evaluation`, both evaluation streams advance per block."""

    def __init__(self, model: nn.Module, weights: ShardedWeights, evaluation: StreamedEvaluation | None) -> None:
        self.model = model
        self.weights = weights
        self.evaluation = evaluation
        self.prefix, self.blocks = find_blocks(model)

    def load(self, index: int) -> None:
        block = self.blocks[index]
        names = [f"{self.prefix}.{index}.{key}" for key in unique_tensors(block)]
        _load(self.model, self.weights, names)
        check_weights_finite(block, f"block {self.prefix}.{index}")
        if self.evaluation is not None:
            self.evaluation.advance("original", block)

    def shard_metadata(self, index: int) -> dict[str, str]:
        """The header metadata of block `index`'s shard: the format version its own layers need."""
        version = needed_version(layer_settings(self.blocks[index]), None)
        return {"format": "pt", "quant_method": QUANT_METHOD, "format_version": str(version)}

    def finish(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The compressed block's tensors as stored (float16), and the evaluation streams; the block's tensors are
        then released (moved to the meta device, shapes kept)."""
        block = self.blocks[index]
        round_to_storage(block)
        streams = {}
        if self.evaluation is not None:
            self.evaluation.advance("compressed", block)
            streams = self.evaluation.streams()
        tensors = {f"{self.prefix}.{index}.{k}": v for k, v in packed_state_dict(block).items()}
        block.to("meta")
        release_free_memory()
        return tensors, streams

    def start(self, streams: dict[str, list[torch.Tensor]]) -> None:
        """Once the blocks' first inputs are taken: continue the evaluation streams of a resumed run, and drop the
        tensors outside the blocks until the end (`load_outside`), so the blocks' turn holds only a block."""
        if self.evaluation is not None:
            self.evaluation.resume(streams)
        from accelerate.utils import set_module_tensor_to_device

        for name in self.weights.files:  # (names as tied when the model was opened)
            if not name.startswith(self.prefix + "."):
                set_module_tensor_to_device(self.model, name, "meta")
        self.model.tie_weights()
        release_free_memory()


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the system. The many layer-sized temporaries of one block leave the
    C heap fragmented; without this the resident size creeps up block after block (measured: about 400 MiB over
    the 28 blocks of a 1.5B model)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class StreamedEvaluation:
    """The evaluation windows' hidden states through the original blocks and through the compressed ones.

    Both start at the start of the run: the original stream embedded by the source's tensors, the compressed one by
    the float16 tensors of the export (rounded in place, captured, then read again from the source, so the
    calibration inputs and the original's head stay at full precision, as in an in-memory run)."""

    def __init__(self, model: nn.Module, weights: ShardedWeights, windows: torch.Tensor, batch_size: int) -> None:
        original = capture_first_block_inputs(model, windows, batch_size)
        round_to_storage(model)
        compressed = capture_first_block_inputs(model, windows, batch_size)
        load_outside(model, weights)
        self.args, self.kwargs = original.args, original.kwargs
        self.hidden = {"original": original.hidden, "compressed": compressed.hidden}
        self.tuple_output = False

    @torch.no_grad()
    def advance(self, stream: str, block: nn.Module) -> None:
        outputs = []
        for hidden, args, kwargs in zip(self.hidden[stream], self.args, self.kwargs, strict=True):
            output = block(hidden, *args, **kwargs)
            self.tuple_output = isinstance(output, (tuple, list))
            outputs.append(output[0] if self.tuple_output else output)
        self.hidden[stream] = outputs

    def streams(self) -> dict[str, list[torch.Tensor]]:
        flag = [torch.tensor(self.tuple_output)]
        return {"eval-original": self.hidden["original"], "eval-compressed": self.hidden["compressed"],
                "eval-tuple": flag}  # fmt: skip

    def resume(self, streams: dict[str, list[torch.Tensor]]) -> None:
        if "eval-original" in streams:
            self.hidden = {"original": streams["eval-original"], "compressed": streams["eval-compressed"]}
            self.tuple_output = bool(streams["eval-tuple"][0])

    def replay(self, model: nn.Module, stream: str) -> _Replay:
        """A context in which `model(input_ids=...)` on the evaluation batches, in order, returns the logits (or
        last hidden states) of the `stream` model: the blocks are replaced by the stream's final hidden states."""
        return _Replay(model, self.hidden[stream], self.tuple_output)


class _ReplayBlock(nn.Module):
    def __init__(self, outputs: list[torch.Tensor] | None, tuple_output: bool) -> None:
        super().__init__()
        self.outputs = iter(outputs) if outputs is not None else None
        self.tuple_output = tuple_output

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        output = next(self.outputs) if self.outputs is not None else hidden
        return (output,) if self.tuple_output else output


class _Replay:
    def __init__(self, model: nn.Module, outputs: list[torch.Tensor], tuple_output: bool) -> None:
        self.prefix, self.blocks = find_blocks(model)
        self.outputs, self.tuple_output = outputs, tuple_output
        self.saved: list[nn.Module] = []

    def __enter__(self) -> None:
        self.saved = list(self.blocks)
        for index in range(len(self.blocks)):
            self.blocks[index] = _ReplayBlock(self.outputs if index == 0 else None, self.tuple_output)

    def __exit__(self, *exc) -> None:
        for index, block in enumerate(self.saved):
            self.blocks[index] = block


def link_shards(model: nn.Module, block_files: list[Path], directory: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """Assemble a sharded checkpoint in `directory`: shard 1 holds every tensor outside the blocks, shard i + 2
    is block i (hard-linked from the run state, not copied). Writes the index and returns it. The model is left a
    skeleton: its tensors outside the blocks go to the meta device as they are written."""
    from accelerate.utils import set_module_tensor_to_device

    from compress.export import save_safetensors

    prefix, blocks = find_blocks(model)
    count = len(block_files) + 1
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    outside = packed_state_dict(model, exclude=prefix + ".")
    for name in outside:  # the float32 tensors are not needed once their float16 copies are made
        set_module_tensor_to_device(model, name, "meta")
    save_safetensors(outside, directory / names[0], metadata)
    weight_map = dict.fromkeys(outside, names[0])
    for name, source in zip(names[1:], block_files, strict=True):
        try:
            os.link(source, directory / name)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(source, directory / name)
        with safe_open(str(directory / name), "pt") as handle:
            weight_map.update(dict.fromkeys(handle.keys(), name))
    total = sum((directory / name).stat().st_size for name in names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index
