"""`compress run --resume`: a run stopped anywhere continues from its finished stages and blocks and writes the
same files as a run that was never stopped."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress import pipeline
from compress.errors import CompressError
from compress.registry import STAGES
from compress.run_state import run_directory
from tests.conftest import tiny_recipe

COMPARED = ("model.safetensors", "config.json", "tokenizer.json")  # recipe.yaml names its own output
NUPES_DATA_DRIVEN = {"stage": "nupes", "mode": "data-driven", "bits": 3, "group_size": 32, "steps": 4}


def same_files(first: Path, second: Path) -> None:
    for name in COMPARED:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


class Crash(Exception):
    pass


def crash_at(monkeypatch, stage: str, block: int | None = None) -> None:
    """Make stage `stage` fail when it reaches `block` (or, for a whole-model stage, when it starts)."""
    entry = STAGES[stage]
    if block is None:

        def apply(*args, **kwargs):
            raise Crash

        monkeypatch.setitem(STAGES, stage, dataclasses.replace(entry, apply=apply))
        return
    original = entry.block

    def compress_block(module, index, *args):
        if index == block:
            raise Crash
        return original(module, index, *args)

    monkeypatch.setitem(STAGES, stage, dataclasses.replace(entry, block=compress_block))


@pytest.mark.parametrize(
    "stages, stage, block",
    [
        ([NUPES_DATA_DRIVEN], "nupes", 1),
        ([{"stage": "jlcm", "code_bits": 4, "vector_dim": 2, "rows_per_group": 32}], "jlcm", 1),
        ([{"stage": "rtn", "group_size": 32}, {"stage": "pv_tuning", "steps": 2, "validation_windows": 2}],
         "pv_tuning", None),
    ],
    ids=["nupes-block", "jlcm-block", "after-rtn-before-pv"],
)  # fmt: skip
def test_a_stopped_run_resumes_to_the_same_files(stages, stage, block, model_dirs, tmp_path, monkeypatch, one_thread):
    reference = tmp_path / "reference"
    pipeline.run(tiny_recipe(model_dirs["llama"], reference, stages), evaluate=False)
    out = tmp_path / "out"
    recipe = tiny_recipe(model_dirs["llama"], out, stages)
    with monkeypatch.context() as patch:
        crash_at(patch, stage, block)
        with pytest.raises(Crash):
            pipeline.run(recipe, evaluate=False)
    assert not out.exists() and (run_directory(out) / "state.json").is_file()
    result = pipeline.run(recipe, evaluate=False, resume=True)
    same_files(out, reference)
    assert not run_directory(out).exists()
    assert [s.name for s in result.report.stages] == [s["stage"] for s in stages]


def test_a_run_stopped_after_its_last_block_resumes(model_dirs, tmp_path, monkeypatch, one_thread):
    """Killed after the last block was saved but before the stage was marked finished: nothing is redone."""
    from compress.run_state import RunState

    reference = tmp_path / "reference"
    pipeline.run(tiny_recipe(model_dirs["llama"], reference, [NUPES_DATA_DRIVEN]), evaluate=False)
    out = tmp_path / "out"
    recipe = tiny_recipe(model_dirs["llama"], out, [NUPES_DATA_DRIVEN])
    with monkeypatch.context() as patch:

        def finish_stage(self, record):
            raise Crash

        patch.setattr(RunState, "finish_stage", finish_stage)
        with pytest.raises(Crash):
            pipeline.run(recipe, evaluate=False)
    calls = []
    entry = STAGES["nupes"]
    with monkeypatch.context() as patch:
        patch.setitem(STAGES, "nupes", dataclasses.replace(entry, block=lambda *args: calls.append(args)))
        pipeline.run(recipe, evaluate=False, resume=True)
    assert calls == []
    same_files(out, reference)


def test_resume_refuses_the_state_of_another_recipe(model_dirs, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_at(patch, "nupes", 1)
        with pytest.raises(Crash):
            pipeline.run(tiny_recipe(model_dirs["llama"], out, [NUPES_DATA_DRIVEN]), evaluate=False)
    other = tiny_recipe(model_dirs["llama"], out, [{**NUPES_DATA_DRIVEN, "bits": 4}])
    with pytest.raises(CompressError, match="another recipe"):
        pipeline.run(other, evaluate=False, resume=True)
    pipeline.run(other, evaluate=False)  # without --resume the old state is dropped and the run starts over
    assert (out / "model.safetensors").is_file() and not run_directory(out).exists()


def test_kill_9_at_five_moments_then_resume_gives_the_same_bytes(model_dirs, tmp_path):
    """SIGKILL at five random moments of a data-driven nupes run (each kill after more blocks are finished, one of
    them mid-block), resuming after each: the output files equal those of an uninterrupted run."""
    config = {**TINY, "num_hidden_layers": 16}
    model_dir = tmp_path / "model"
    _save_tiny_llama(config, model_dirs["llama"], model_dir)
    stages = [{**NUPES_DATA_DRIVEN, "steps": 24}]
    recipe_path = tmp_path / "recipe.yaml"
    data = {"calibration": {"num_samples": 8, "seq_len": 64}, "evaluation": {"num_windows": 2, "seq_len": 64}}
    raw = {"model": str(model_dir), "data": data, "stages": stages, "export": {"out": str(tmp_path / "out")}}
    recipe_path.write_text(yaml.safe_dump(raw))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "compress", "run", str(recipe_path), "--no-eval"]
    subprocess.run([*command, "--out", str(tmp_path / "reference")], env=environment, check=True, capture_output=True)
    state = run_directory(tmp_path / "out") / "state.json"
    chooser = random.Random(0)
    for _ in range(5):
        finished_before = _blocks_done(state)
        process = subprocess.Popen([*command, "--resume"], env=environment, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_for_blocks(state, finished_before + 1, process)  # each life finishes at least one block
        time.sleep(chooser.uniform(0.0, 0.3))
        assert process.poll() is None, "the run ended before its kill point"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (tmp_path / "out").exists()
    finished = subprocess.run([*command, "--resume"], env=environment, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    same_files(tmp_path / "out", tmp_path / "reference")


TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=320)


def _save_tiny_llama(config: dict, tokenizer_from: Path, path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=512, tie_word_embeddings=True))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)


def _blocks_done(state: Path) -> int:
    try:
        return json.loads(state.read_text())["blocks_done"]
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for_blocks(state: Path, blocks: int, process: subprocess.Popen, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None or _blocks_done(state) >= blocks:
            return  # (a process that already ended leaves the last resume nothing to do)
        time.sleep(0.02)
    raise AssertionError(f"no progress to block {blocks} within {limit} s")
