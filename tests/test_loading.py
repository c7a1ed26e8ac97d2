"""How a checkpoint meets code that is not compress: stock transformers refuses it loudly, `save_pretrained`
writes it back, older format versions still read."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import compress
from compress import pipeline
from compress.export import save_safetensors
from tests.conftest import tiny_recipe

RTN = [{"stage": "rtn", "bits": 4, "group_size": 32}]

STOCK_LOAD = ("import sys; from transformers import AutoModelForCausalLM; "
              "AutoModelForCausalLM.from_pretrained(sys.argv[1])")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def checkpoint(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("loading") / "out"
    pipeline.run(tiny_recipe(model_dirs["llama"], out, RTN), evaluate=False)
    return out


def test_stock_transformers_refuses_a_checkpoint_without_import_compress(checkpoint):
    """A serving script that never imports compress must fail, not generate from randomly initialised layers."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", STOCK_LOAD, str(checkpoint)], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "got compress" in result.stderr  # transformers names the unknown quant_method first
    assert "size mismatch" in result.stderr or "MISMATCH" in result.stderr
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        placeholder = handle.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert placeholder.shape == (0,) and placeholder.dtype == torch.uint8


def test_the_same_load_succeeds_after_import_compress(checkpoint):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = "import compress; " + STOCK_LOAD
    result = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "UNEXPECTED" not in result.stderr and "MISSING" not in result.stderr


def test_save_pretrained_of_a_loaded_checkpoint_writes_a_loadable_checkpoint(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 320, (2, 16))
    loaded = compress.load(checkpoint)
    expected = logits(loaded, ids)
    loaded.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as handle:
        assert handle.metadata()["quant_method"] == "compress" and handle.metadata()["format_version"] == "4"
    again = compress.load(tmp_path / "saved", verify=False)  # no report.json: save_pretrained writes none
    assert torch.equal(logits(again, ids), expected)
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert torch.equal(logits(via_transformers, ids), expected)


def test_save_pretrained_of_a_model_compressed_in_memory(model_dirs, tmp_path):
    result = pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / "out", RTN), evaluate=False)
    result.model.save_pretrained(tmp_path / "saved")
    ids = torch.randint(3, 320, (2, 16))
    assert torch.equal(logits(compress.load(tmp_path / "saved", verify=False), ids), logits(result.model, ids))


def test_a_version_3_checkpoint_without_placeholders_still_loads(checkpoint, tmp_path):
    """Checkpoints written before version 4 have no placeholders; they load as before. A version-3 checkpoint
    that does carry them holds tensors its version does not have, and is refused."""
    import shutil

    from compress.errors import CompressError

    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    config = json.loads((old / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    config["quantization_config"]["format_version"] = 3
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="down_proj.weight is not part of the model"):
        compress.load(old, verify=False)
    tensors = {k: v for k, v in load_file(old / "model.safetensors").items() if k.removesuffix(".weight") not in layers}
    save_safetensors(tensors, old / "model.safetensors", {"format": "pt", "quant_method": "compress",
                                                          "format_version": "3"})  # fmt: skip
    ids = torch.randint(3, 320, (2, 16))
    assert torch.equal(logits(compress.load(old, verify=False), ids), logits(compress.load(checkpoint), ids))


def test_weight_files_are_readable_by_other_users(checkpoint):
    """A server running as another user reads the checkpoint (safetensors writes its file with mode 0600)."""
    for path in checkpoint.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path.name
