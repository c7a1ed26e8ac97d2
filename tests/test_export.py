"""Recipe -> pipeline -> export -> load, on tiny models of each family."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import compress
from compress import pipeline
from compress.errors import CompressError
from compress.formats.uniform import UniformLinear
from tests.conftest import tiny_recipe

RTN = [{"stage": "rtn", "bits": 3, "group_size": 32}]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "opt"])
def test_export_then_load_gives_the_logits_of_the_run(model_dirs, tmp_path, family):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs[family], out, RTN))
    ids = torch.randint(3, 320, (2, 40))
    expected = logits(result.model, ids)
    loaded = compress.load(out)
    assert any(isinstance(m, UniformLinear) for m in loaded.modules())
    assert torch.equal(logits(loaded, ids), expected)
    via_transformers = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(logits(via_transformers, ids), expected)
    for name in ("model.safetensors", "config.json", "recipe.yaml", "report.json", "report.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_report_figures(model_dirs, tmp_path):
    out = tmp_path / "out"
    report = pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN)).report
    saved = json.loads((out / "report.json").read_text())
    assert saved["after"]["bits_per_weight"] == pytest.approx(3 + 19 / 32)
    assert saved["after"]["perplexity"] > 1 and saved["after"]["kl_to_original"] > 0
    assert saved["before"]["perplexity"] > 1
    assert report.stages[0].name == "rtn" and report.stages[0].peak_rss_bytes > 0
    assert saved["total"]["peak_rss_bytes"] >= max(stage["peak_rss_bytes"] for stage in saved["stages"])
    assert len(saved["layers"]) == 14


def test_packed_size_matches_reported_bits(model_dirs, tmp_path):
    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN))
    quantized_bytes = other_bytes = 0
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            size = tensor.numel() * tensor.element_size()
            if key.rpartition(".")[0] in layers and not key.endswith(".bias"):
                quantized_bytes += size
            else:
                other_bytes += size
                assert tensor.dtype == torch.float16
    bits, weights = result.report.after["bits_per_weight"], result.report.after["quantized_weights"]
    assert quantized_bytes * 8 == pytest.approx(bits * weights)
    header = 8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    assert os.path.getsize(out / "model.safetensors") == header + quantized_bytes + other_bytes


def test_encoder_runs_and_reports_embedding_similarity(model_dirs, tmp_path):
    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["bert"], out, RTN))
    assert 0.5 < result.report.after["embedding_cosine"] < 1.0
    loaded = compress.load(out)
    ids = torch.randint(3, 320, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, result.model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_export_loads_in_stock_transformers(model_dirs, tmp_path, family):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    result = pipeline.run(tiny_recipe(model_dirs[family], out, RTN, export={"out": str(out), "format": "dense"}))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(isinstance(m, UniformLinear) for m in dense.modules())
    ids = torch.randint(3, 320, (2, 24))
    torch.testing.assert_close(logits(dense, ids), logits(result.model, ids), rtol=1e-2, atol=1e-2)


def test_existing_output_is_kept_unless_forced(model_dirs, tmp_path):
    out = tmp_path / "out"
    pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN), evaluate=False)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CompressError, match="already exists; pass --force"):
        pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN))
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(CompressError, match=r"holds files compress did not write \(keep.txt\)"):
        pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN), force=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    before = (out / "model.safetensors").stat().st_ino
    pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN), force=True, evaluate=False)
    assert (out / "model.safetensors").stat().st_ino != before


def test_a_failing_export_leaves_nothing_behind(model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "save_checkpoint", broken)
        with pytest.raises(OSError):
            pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN))
    # No output, nothing half-written: only the hidden state of the finished stages, which --resume continues from.
    assert [p.name for p in tmp_path.iterdir()] == [".out.run"]
    pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN), resume=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CompressError, match="no config.json"):
        compress.load(tmp_path)
