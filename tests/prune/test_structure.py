"""Physical removal of zeroed groups: same outputs, smaller layers, a config that says so (stock when every block
is alike), and checkpoints of blocks that differ that load back, also in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import compress
from compress.errors import CompressError
from compress.export import atomic_directory, save_checkpoint
from compress.prune.groups import scale_groups
from compress.prune.structure import express_in_config, find_groups, remove_groups, structure_record
from tests.conftest import build_model, model_output

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["mlp_channels", "attention_heads"]


pytestmark = pytest.mark.usefixtures("one_thread")


def prune(model, head_groups="kv", uneven=True):
    """Zero and remove a quarter of the MLP channels (half in the last block when `uneven`) and one head group per
    block; returns the outputs before and after the removal on a fixed batch."""
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    families = find_groups(model, KINDS, head_groups)
    masks = []
    for index, family in enumerate(families):
        mask = torch.zeros(family.count, dtype=torch.bool)
        if family.kind == "mlp_channels":
            share = 2 if uneven and index >= len(families) - 2 else 4
            order = torch.randperm(family.count, generator=torch.Generator().manual_seed(index))
            mask[order[: family.count // share]] = True
        else:
            mask[0] = True
        scale_groups(model, family, mask.nonzero().squeeze(1), 0.0)
        masks.append(mask)
    before = model_output(model, ids)
    remove_groups(model, families, masks)
    return before, model_output(model, ids), ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "bert"])
def test_removal_keeps_the_outputs_and_shrinks_the_layers(family):
    model = build_model(family)
    parameters = sum(p.numel() for p in model.parameters())
    before, after, _ = prune(model)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in model.parameters()) < parameters
    block = model.model.layers[0] if family != "bert" else model.encoder.layer[0]
    linear = block.mlp.down_proj if family != "bert" else block.output.dense
    assert linear.in_features == 96  # 128 channels, a quarter removed (half in the last block)


def test_equal_blocks_make_a_stock_config_and_differing_ones_a_structure_record():
    model = build_model("llama")
    prune(model, uneven=False)
    assert structure_record(model) is not None and express_in_config(model)
    config = model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        96, 2, 1, 16)  # fmt: skip
    assert structure_record(model) is None
    model = build_model("llama")
    prune(model, head_groups="query", uneven=False)  # GQA kept: 2 KV heads, 1 query head each
    assert express_in_config(model) and model.config.num_key_value_heads == 2
    assert model.model.layers[0].self_attn.num_key_value_groups == 1
    bert = build_model("bert")
    prune(bert, uneven=False)
    assert not express_in_config(bert)  # a stock BERT config derives the head size from the head count
    assert structure_record(bert) == {f"encoder.layer.{i}": {"intermediate_size": 96, "num_attention_heads": 3}
                                      for i in range(2)}  # fmt: skip


def save(model, tokenizer_dir, out, export_format="packed"):
    from transformers import AutoTokenizer

    with atomic_directory(out) as directory:
        save_checkpoint(model, AutoTokenizer.from_pretrained(tokenizer_dir), directory, export_format=export_format,
                        recipe_yaml="")  # fmt: skip


FRESH = """
import sys, torch
from safetensors.torch import save_file
import compress
from transformers import AutoModel, AutoModelForCausalLM
ids = torch.tensor({ids})
out = {{}}
for name, path in [("llama", sys.argv[1]), ("bert", sys.argv[2]), ("stock", sys.argv[3])]:
    loaded = compress.load(path, verify=False)
    auto = (AutoModel if name == "bert" else AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32)
    for key, model in (("load", loaded), ("auto", auto)):
        with torch.no_grad():
            result = model(input_ids=ids)
        out[f"{{name}}.{{key}}"] = result.last_hidden_state if name == "bert" else result.logits
save_file(out, sys.argv[4])
"""


def test_checkpoints_of_pruned_models_load_in_a_fresh_process(tokenizer_dir, tmp_path):
    models, paths = {}, {}
    for name, family, uneven in (("llama", "llama", True), ("bert", "bert", False), ("stock", "qwen2", False)):
        model = build_model(family)
        prune(model, uneven=uneven)
        express_in_config(model)
        paths[name] = tmp_path / name
        save(model, tokenizer_dir, paths[name])
        models[name] = model
    llama = json.loads((paths["llama"] / "config.json").read_text())
    assert llama["quantization_config"]["format_version"] == 2 and llama["intermediate_size"] == 128
    structure = llama["quantization_config"]["structure"]
    assert [structure[f"model.layers.{i}"]["intermediate_size"] for i in range(2)] == [96, 64]
    stock = json.loads((paths["stock"] / "config.json").read_text())
    assert "quantization_config" not in stock and stock["intermediate_size"] == 96 and stock["head_dim"] == 16
    ids = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    script = FRESH.format(ids=ids.tolist())
    results = tmp_path / "results.safetensors"
    command = [sys.executable, "-c", script, *(str(paths[n]) for n in ("llama", "bert", "stock")), str(results)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = load_file(str(results))
    for name, model in models.items():
        from compress.export import round_to_storage

        round_to_storage(model)  # the checkpoint holds float16 values
        expected = model_output(model, ids)
        # the same values as the pruned model; the kernels may differ in the last bits with the weights' layout
        torch.testing.assert_close(loaded[f"{name}.load"], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(loaded[f"{name}.auto"], loaded[f"{name}.load"])


def test_a_damaged_structure_record_is_refused_by_name(tokenizer_dir, tmp_path):
    model = build_model("llama")
    prune(model)
    save(model, tokenizer_dir, tmp_path / "c")
    config_path = tmp_path / "c" / "config.json"
    original = json.loads(config_path.read_text())
    cases = [
        ({"model.layers.7": {}}, "names block 'model.layers.7', which the model does not have"),
        ({"model.layers.0": {"intermediate_size": 96}}, "must have exactly the keys"),
        ({"model.layers.0": {"intermediate_size": 96, "num_attention_heads": 3, "num_key_value_heads": 2}},
         "num_attention_heads must be a multiple of num_key_value_heads"),
        ({"model.layers.0": {"intermediate_size": 999, "num_attention_heads": 2, "num_key_value_heads": 1}},
         "must be whole numbers from 1"),
    ]  # fmt: skip
    for structure, message in cases:
        changed = json.loads(json.dumps(original))
        changed["quantization_config"]["structure"] = structure
        config_path.write_text(json.dumps(changed))
        with pytest.raises(CompressError, match=message):
            compress.load(tmp_path / "c", verify=False)
    changed["quantization_config"]["format_version"] = 1
    config_path.write_text(json.dumps(changed))
    with pytest.raises(CompressError, match="structure needs format version 2"):
        compress.load(tmp_path / "c", verify=False)
