"""`--offload-activations`: the calibration activations in files, one batch in memory at a time, give the same
checkpoint as activations in memory; `--max-memory` offloads when the activations are what does not fit."""

import pytest
import torch
from safetensors.torch import load_file

from compress import pipeline
from compress.calib import BlockInputs
from compress.memory_plan import plan_memory
from compress.offload import DiskTensors, empty_like, save_incrementally
from compress.run_state import run_directory
from tests.conftest import tiny_recipe
from tests.test_resume import NUPES_DATA_DRIVEN, Crash, crash_at, same_files


def test_disk_tensors_read_back_what_was_written_and_clean_up(tmp_path):
    tensors = [torch.randn(2, 3, 4), torch.arange(6, dtype=torch.int64), torch.randn(5).to(torch.bfloat16)]
    stored = DiskTensors(tmp_path)
    stored.extend(tensors)
    assert len(stored) == 3 and all(torch.equal(a, b) for a, b in zip(stored, tensors, strict=True))
    assert torch.equal(stored[-1], tensors[-1]) and stored.shape(0) == ((2, 3, 4), torch.float32)
    with pytest.raises(IndexError):
        stored[3]
    sibling = empty_like(stored)
    assert isinstance(sibling, DiskTensors) and sibling.directory != stored.directory and empty_like([]) == []
    directory = stored.directory
    assert len(list(directory.iterdir())) == 3
    del stored
    assert not directory.exists()


def test_incremental_save_is_a_safetensors_file_of_every_tensor(tmp_path):
    on_disk = DiskTensors(tmp_path / "scratch")
    on_disk.extend([torch.randn(3, 5), torch.randn(1, 5)])
    in_memory = [torch.randn(2, 2).half(), torch.randint(0, 9, (4,))]
    save_incrementally({"calibration": on_disk, "eval-original": in_memory}, tmp_path / "s.safetensors", {"a": "1"})
    loaded = load_file(str(tmp_path / "s.safetensors"))
    assert sorted(loaded) == ["calibration.0", "calibration.1", "eval-original.0", "eval-original.1"]
    assert torch.equal(loaded["calibration.1"], on_disk[1]) and torch.equal(loaded["eval-original.0"], in_memory[0])


@pytest.fixture
def offloaded_batches(monkeypatch):
    """Count the batches written to disk during a run."""
    counts = []
    original = DiskTensors.append

    def append(self, tensor):
        counts.append(tuple(tensor.shape))
        original(self, tensor)

    monkeypatch.setattr(DiskTensors, "append", append)
    return counts


def test_an_offloaded_run_writes_the_in_memory_checkpoint(model_dirs, tmp_path, one_thread, offloaded_batches):
    stages = [NUPES_DATA_DRIVEN]
    pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / "memory", stages), evaluate=False)
    assert not offloaded_batches
    out = tmp_path / "offloaded"
    pipeline.run(tiny_recipe(model_dirs["llama"], out, stages), evaluate=False, offload=True)
    assert len(offloaded_batches) > 2  # the first block's inputs and each block's outputs went to disk
    same_files(out, tmp_path / "memory")
    assert not run_directory(out).exists()  # the activations' folder went with the run state


def test_an_offloaded_run_resumes_to_the_same_files(model_dirs, tmp_path, monkeypatch, one_thread):
    stages = [NUPES_DATA_DRIVEN]
    pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / "reference", stages), evaluate=False)
    out = tmp_path / "out"
    recipe = tiny_recipe(model_dirs["llama"], out, stages)
    with monkeypatch.context() as patch:
        crash_at(patch, "nupes", 1)
        with pytest.raises(Crash):
            pipeline.run(recipe, evaluate=False, offload=True)
    seen = []
    run = BlockInputs.run

    def spy(self, block, batches=None):
        seen.append(type(self.hidden))
        return run(self, block, batches)

    monkeypatch.setattr(BlockInputs, "run", spy)
    pipeline.run(recipe, evaluate=False, resume=True, offload=True)
    assert seen and all(kind is DiskTensors for kind in seen)  # the saved inputs of block 1 went back to disk
    same_files(out, tmp_path / "reference")


def test_max_memory_offloads_when_the_activations_do_not_fit(model_dirs, tmp_path):
    recipe = tiny_recipe(model_dirs["llama"], tmp_path / "out", [NUPES_DATA_DRIVEN])
    recipe.data.calibration.num_samples = 256  # the activations outweigh the tiny model
    plan = plan_memory(recipe, 2**40, stream=False)
    assert not plan.stream and not plan.offload
    whole = plan.total(plan.in_memory)
    offloaded = plan_memory(recipe, 2**40, stream=False, offload=True)
    assert plan.total(offloaded.in_memory) < whole - 0.9 * plan.in_memory["calibration activations"]
    chosen = plan_memory(recipe, (whole + plan.total(offloaded.in_memory)) // 2, stream=False)
    assert chosen.offload and not chosen.stream
