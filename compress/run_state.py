"""What a run has finished, kept beside its output so `compress run --resume` continues a killed run.

The directory `.<out>.run/` holds:

- `state.json`: the fingerprint of the recipe and model, the records of the finished stages, the stage under way
  and how many of its blocks are finished;
- `stage-S/block-IIIII.safetensors`: block I as stage S left it, and `block-IIIII.json` its layer records (in
  streaming mode the block file is already the checkpoint's shard);
- `stage-S/streams-IIIII.safetensors`: the hidden states entering block I (calibration, and in streaming mode the
  evaluation streams), so the next block needs nothing recomputed;
- `stage-S/model.safetensors`: the whole model after a stage that is not block-local (pv_tuning, hesso), or a
  block-local one that also changed the model outside its blocks (`allocate` compressing the output head).

Every file is written under a temporary name and renamed into place; `state.json` is rewritten last, so whatever
the moment of a kill, the state names only complete files. The directory is removed once the export is complete.
It carries compress's ownership marker (compress/ownership.py): a directory of that name without it is the user's,
and a run refuses to start rather than delete it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from compress.errors import CompressError
from compress.models import find_blocks
from compress.offload import DiskTensors, save_incrementally
from compress.ownership import make_owned, refuse_unowned, remove_owned

log = logging.getLogger(__name__)

STATE = "state.json"
STATE_VERSION = 1
KIND = "run state"


def run_directory(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.run"


def fingerprint(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class RunState:
    """The checkpoints of one run (see the module docstring). Only the writing process (`writer`) saves."""

    def __init__(self, directory: Path, identity: str, *, resume: bool, writer: bool = True) -> None:
        self.directory = directory
        self.writer = writer
        refuse_unowned(directory, KIND)
        self.state: dict[str, Any] = {"version": STATE_VERSION, "fingerprint": identity, "stages": [], "blocks_done": 0}
        found = self._read()
        if resume and found is None:
            log.warning("--resume: no state of an earlier run in %s; starting from the beginning", directory)
        elif resume and (found.get("fingerprint") != identity or found.get("version") != STATE_VERSION):
            raise CompressError(
                f"--resume: the state in {str(directory)!r} was left by a run of another recipe, model or compress "
                "version; run without --resume to start over"
            )
        elif resume:
            self.state = found
            log.info("resuming after stage %d, block %d", len(found["stages"]), found["blocks_done"])
        elif found is not None:
            log.warning("an earlier run left its state in %s; starting over (--resume continues it)", directory)
        if self.state is not found and writer:
            remove_owned(directory, KIND)

    def scratch(self, name: str) -> Path:
        """A folder for temporary files of the run, inside the run state (removed with it)."""
        return make_owned(self.directory, KIND) / name

    # -- what is finished --------------------------------------------------------------------------------------
    @property
    def stages_done(self) -> int:
        return len(self.state["stages"])

    @property
    def stage_records(self) -> list[dict[str, Any]]:
        return list(self.state["stages"])

    def blocks_done(self, stage_index: int) -> int:
        return self.state["blocks_done"] if stage_index == self.stages_done else 0

    # -- block-local stages ------------------------------------------------------------------------------------
    def save_block(
        self,
        stage_index: int,
        index: int,
        tensors: dict[str, torch.Tensor],
        layers: dict[str, dict[str, Any]],
        streams: dict[str, list[torch.Tensor]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        if not self.writer:
            return
        folder = self._stage(stage_index)
        records = self.block_file(stage_index, index).with_suffix(".json")
        temporary = records.with_name(records.name + ".partial")
        temporary.write_text(json.dumps(layers, sort_keys=True))
        os.replace(temporary, records)
        _atomic_save(tensors, self.block_file(stage_index, index), metadata or {})
        if streams:  # one tensor at a time: offloaded activations are never all in memory
            path = folder / f"streams-{index + 1:05d}.safetensors"
            temporary = path.with_name(path.name + ".partial")
            save_incrementally(streams, temporary, {})
            os.replace(temporary, path)
        self.state["blocks_done"] = index + 1
        self._write()
        previous = folder / f"streams-{index:05d}.safetensors"
        previous.unlink(missing_ok=True)

    def block_file(self, stage_index: int, index: int) -> Path:
        return self._stage(stage_index) / f"block-{index:05d}.safetensors"

    def block_layers(self, stage_index: int, index: int) -> dict[str, dict[str, Any]]:
        return json.loads(self.block_file(stage_index, index).with_suffix(".json").read_text())

    def streams(self, stage_index: int, offload: Path | None = None) -> dict[str, list[torch.Tensor] | DiskTensors]:
        """The hidden states entering the first unfinished block of the stage under way; the calibration ones
        copied into files under `offload` (one at a time) when given."""
        path = self._stage(stage_index) / f"streams-{self.blocks_done(stage_index):05d}.safetensors"
        if not path.is_file():
            return {}
        found: dict[str, dict[int, str]] = {}
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                kind, _, number = key.rpartition(".")
                found.setdefault(kind, {})[int(number)] = key
            streams: dict[str, list[torch.Tensor] | DiskTensors] = {}
            for kind, keys in found.items():
                streams[kind] = DiskTensors(offload) if offload is not None and kind == "calibration" else []
                for number in sorted(keys):
                    streams[kind].append(handle.get_tensor(keys[number]))
        return streams

    def restore_block(self, model: nn.Module, stage_index: int, index: int, context, tensors: bool = True) -> None:
        """Put block `index` back as stage `stage_index` left it: its compressed layers, records and (unless
        `tensors` is false, for a streamed block that stays on the meta device) its tensors."""
        from compress.hf import install_empty_modules

        prefix, blocks = find_blocks(model)
        layers = self.block_layers(stage_index, index)
        install_empty_modules(model, {name: {"format": r["format"], **r["settings"]} for name, r in layers.items()})
        if tensors:
            _load_into(blocks[index], self.block_file(stage_index, index))
        context.layers.update(layers)

    # -- whole-model stages ------------------------------------------------------------------------------------
    def save_model(self, stage_index: int, model: nn.Module, context) -> None:
        """The whole model after stage `stage_index` (a stage that is not block-local, or one that changed what lies
        outside the blocks)."""
        if not self.writer:
            return
        from compress.export import layer_settings
        from compress.formats.embedding import shared_embeddings
        from compress.prune.structure import block_sizes

        path = self._stage(stage_index) / "model.safetensors"
        temporary = path.with_name(path.name + ".partial")
        metadata = {
            "compress.layers": json.dumps(context.layers, sort_keys=True),
            "compress.settings": json.dumps(layer_settings(model), sort_keys=True),
            "compress.sizes": json.dumps(block_sizes(model), sort_keys=True),
            "compress.embeddings": json.dumps(shared_embeddings(model), sort_keys=True),
        }
        save_model(model, str(temporary), metadata=metadata)
        os.replace(temporary, path)

    def has_model(self, stage_index: int) -> bool:
        """Whether stage `stage_index` left a whole-model checkpoint."""
        return (self._folder(stage_index) / "model.safetensors").is_file()

    def restore_model(self, stage_index: int, model: nn.Module, context) -> None:
        from compress.hf import install_empty_modules
        from compress.prune.structure import apply_structure, block_sizes, express_in_config

        path = self._stage(stage_index) / "model.safetensors"
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        sizes = json.loads(metadata["compress.sizes"])
        if sizes and sizes != block_sizes(model):
            apply_structure(model, sizes, str(path))
            express_in_config(model)
        install_empty_modules(model, json.loads(metadata["compress.settings"]))
        embeddings = json.loads(metadata.get("compress.embeddings", "{}"))
        if embeddings:
            from compress.formats.embedding import install_shared_embeddings
            from compress.stages.head import untie

            install_shared_embeddings(model, embeddings, str(path))
            untie(model)
        missing, unexpected = load_model(model, str(path), strict=False)
        if missing or unexpected:
            raise CompressError(f"run state {str(path)!r} does not fit the model: {missing or unexpected}")
        context.layers.clear()
        context.layers.update(json.loads(metadata["compress.layers"]))

    # -- progress ----------------------------------------------------------------------------------------------
    def finish_stage(self, record: dict[str, Any]) -> None:
        self.state["stages"].append(record)
        self.state["blocks_done"] = 0
        if self.writer:
            self._write()

    def discard(self) -> None:
        if self.writer:
            remove_owned(self.directory, KIND)

    def _folder(self, stage_index: int) -> Path:
        return self.directory / f"stage-{stage_index}"

    def _stage(self, stage_index: int) -> Path:
        folder = self._folder(stage_index)
        if self.writer:
            make_owned(self.directory, KIND)
            folder.mkdir(exist_ok=True)
        return folder

    def _read(self) -> dict[str, Any] | None:
        path = self.directory / STATE
        if not path.is_file():
            return None
        try:
            found = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CompressError(f"run state {str(path)!r} is damaged ({error}); remove it to start over") from error
        return found if isinstance(found, dict) else None

    def _write(self) -> None:
        make_owned(self.directory, KIND)
        path = self.directory / STATE
        temporary = path.with_name(path.name + ".partial")
        temporary.write_text(json.dumps(self.state, sort_keys=True, default=str))
        os.replace(temporary, path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from compress.export import save_safetensors

    temporary = path.with_name(path.name + ".partial")
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary, metadata)
    os.replace(temporary, path)


def _load_into(module: nn.Module, path: Path) -> None:
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    module.load_state_dict(tensors, strict=True)
