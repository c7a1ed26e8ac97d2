"""Streaming: a model compressed block by block from its safetensors shards, never held whole, gives the
checkpoint an in-memory run gives; `--max-memory` chooses the mode or refuses at the start."""

import dataclasses
import json

import pytest
import torch

import compress
from compress import pipeline
from compress.errors import CompressError
from compress.memory_plan import parse_size, plan_memory
from compress.models import find_blocks
from compress.registry import STAGES
from compress.run_state import run_directory
from tests.conftest import build_model, tiny_recipe

STAGES_TRIED = {
    "rtn": {"stage": "rtn", "bits": 4, "group_size": 32},
    "nupes-data-free": {"stage": "nupes", "bits": 3, "group_size": 32},
    "nupes-data-driven": {"stage": "nupes", "mode": "data-driven", "bits": 3, "group_size": 32, "steps": 4},
}


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, tokenizer_dir):
    """The tiny Llama saved in several safetensors shards, as large checkpoints are."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("sharded")
    build_model("llama").save_pretrained(path, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(STAGES_TRIED))
def test_streamed_run_gives_the_in_memory_checkpoint(name, sharded_llama, tmp_path, one_thread):
    stage = STAGES_TRIED[name]
    memory = pipeline.run(tiny_recipe(sharded_llama, tmp_path / "memory", [stage]))
    streamed = pipeline.run(tiny_recipe(sharded_llama, tmp_path / "streamed", [stage]), stream=True)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + 2  # outside the blocks, then one shard per block
    ids = torch.randint(3, 320, (2, 24))
    assert torch.equal(
        logits(compress.load(tmp_path / "streamed"), ids), logits(compress.load(tmp_path / "memory"), ids)
    )
    for key in ("perplexity", "kl_to_original", "bits_per_weight"):
        before, after = memory.report.before, memory.report.after
        s_before, s_after = streamed.report.before, streamed.report.after
        if key in before:
            assert s_before[key] == pytest.approx(before[key], rel=1e-6)
        # the in-memory model is evaluated through the runtime (its norms fused, compress/runtime/norms.py), the
        # streamed one block by block through transformers' norms: the same values up to rounding
        assert s_after[key] == pytest.approx(after[key], rel=1e-6, abs=1e-7)
    assert streamed.report.model["parameters"] == memory.report.model["parameters"]
    assert streamed.report.layers.keys() == memory.report.layers.keys()


def test_only_one_block_holds_weights_at_a_time(sharded_llama, tmp_path, monkeypatch, one_thread):
    from compress.streaming import BlockStreamer

    loaded_blocks = []
    load = BlockStreamer.load

    def checked_load(self, index):
        load(self, index)
        _, blocks = find_blocks(self.model)
        real = [i for i, block in enumerate(blocks) if any(not t.is_meta for t in block.state_dict().values())]
        loaded_blocks.append(real)
        assert self.model.model.embed_tokens.weight.is_meta  # the tensors outside the blocks wait on disk

    monkeypatch.setattr(BlockStreamer, "load", checked_load)
    pipeline.run(tiny_recipe(sharded_llama, tmp_path / "out", [STAGES_TRIED["nupes-data-driven"]]), stream=True)
    assert loaded_blocks == [[0], [1]]


def test_a_stopped_streamed_run_resumes_to_the_same_files(sharded_llama, tmp_path, monkeypatch, one_thread):
    stage = STAGES_TRIED["nupes-data-driven"]
    pipeline.run(tiny_recipe(sharded_llama, tmp_path / "reference", [stage]), stream=True)
    out = tmp_path / "out"
    recipe = tiny_recipe(sharded_llama, out, [stage])
    entry = STAGES["nupes"]

    def crash(block, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return entry.block(block, index, *args)

    with monkeypatch.context() as patch:
        patch.setitem(STAGES, "nupes", dataclasses.replace(entry, block=crash))
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(recipe, stream=True)
    assert not out.exists()
    resumed = pipeline.run(recipe, stream=True, resume=True)
    shards = sorted(p.name for p in (tmp_path / "reference").glob("model-*.safetensors"))
    assert shards and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    for name in [*shards, "model.safetensors.index.json", "config.json"]:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert len(resumed.report.layers) == 14 and not run_directory(out).exists()


def test_streaming_refuses_what_it_cannot_do(sharded_llama, tmp_path):
    recipe = tiny_recipe(sharded_llama, tmp_path / "out", [STAGES_TRIED["rtn"], {"stage": "pv_tuning", "steps": 1}])
    with pytest.raises(CompressError, match="pv_tuning works on the whole model and cannot stream"):
        pipeline.run(recipe, stream=True)
    assert not (tmp_path / "out").exists()


def test_max_memory_streams_when_the_model_does_not_fit_and_refuses_when_nothing_fits(sharded_llama, tmp_path):
    recipe = tiny_recipe(sharded_llama, tmp_path / "out", [STAGES_TRIED["nupes-data-driven"]])
    plan = plan_memory(recipe, 2**40, stream=False)
    assert not plan.stream
    in_memory, streamed = plan.total(plan.in_memory), plan.total(plan.streamed)
    assert streamed < in_memory
    assert plan_memory(recipe, (streamed + in_memory) // 2, stream=False, offload=True).stream
    smallest = plan_memory(recipe, 2**40, stream=True, offload=True)
    with pytest.raises(CompressError, match="too small.*calibration activations"):
        plan_memory(recipe, smallest.total(smallest.streamed) - 1, stream=False)
    training = tiny_recipe(sharded_llama, tmp_path / "out", [STAGES_TRIED["rtn"], {"stage": "pv_tuning"}])
    with pytest.raises(CompressError, match="cannot stream"):
        plan_memory(training, in_memory // 2, stream=False)


@pytest.mark.parametrize("text, size", [("2.5GB", int(2.5 * 2**30)), ("800M", 800 * 2**20), ("3GiB", 3 * 2**30),
                                        ("1000", 1000)])  # fmt: skip
def test_sizes(text, size):
    assert parse_size(text) == size


def test_a_bad_size_is_refused():
    with pytest.raises(CompressError, match="--max-memory 'lots'"):
        parse_size("lots")


def test_streamed_shards_carry_the_version_their_layers_need(sharded_llama, tmp_path, one_thread):
    """jlcm with kept columns (format version 3, and 4 for the placeholders): each shard says 4, as does the
    config; the logits are those of the in-memory run."""
    from safetensors import safe_open

    stage = {"stage": "jlcm", "code_bits": 4, "vector_dim": 2, "rows_per_group": 32, "outlier_threshold": 1.5}
    memory = tmp_path / "memory"
    pipeline.run(tiny_recipe(sharded_llama, memory, [stage]), evaluate=False)
    streamed = tmp_path / "streamed"
    pipeline.run(tiny_recipe(sharded_llama, streamed, [stage]), evaluate=False, stream=True)
    config = json.loads((streamed / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 4
    for shard in sorted(streamed.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            assert handle.metadata()["format_version"] == "4", shard.name
    ids = torch.randint(3, 320, (2, 24))
    assert torch.equal(logits(compress.load(streamed), ids), logits(compress.load(memory), ids))
