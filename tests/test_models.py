import pytest
import torch

from compress.errors import CompressError
from compress.models import dense_weight, find_blocks, find_linears, load_model
from tests.conftest import FAMILIES, build_model

EXPECTED_LINEARS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "bert": {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"},
}
BLOCKS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "bert": "encoder.layer",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_blocks_and_their_linears(family):
    model = build_model(family)
    name, blocks = find_blocks(model)
    assert name == BLOCKS[family] and len(blocks) == 2
    linears = find_linears(blocks[1], ["Linear", "Conv1D"], [], prefix=f"{name}.1")
    assert len(linears) == len(EXPECTED_LINEARS[family])
    for suffix in EXPECTED_LINEARS[family]:
        assert sum(n.endswith(suffix) for n in linears) >= 1, suffix
    assert all(n.startswith(f"{name}.1.") for n in linears)


def test_ignore_patterns_and_targets():
    model = build_model("llama")
    _, blocks = find_blocks(model)
    kept = find_linears(blocks[0], ["Linear"], ["mlp\\."], prefix="model.layers.0")
    assert set(kept) == {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert find_linears(blocks[0], ["Conv1D"], [], prefix="x") == {}


def test_conv1d_weight_is_read_as_out_by_in():
    model = build_model("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc
    assert dense_weight(c_fc).shape == (256, 64)  # n_inner = 4 * n_embd
    x = torch.randn(2, 64)
    torch.testing.assert_close(c_fc(x), x @ dense_weight(c_fc).T + c_fc.bias)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_loads_local_directories_with_the_right_kind(model_dirs, family):
    loaded = load_model(str(model_dirs[family]))
    assert loaded.kind == ("encoder" if family == "bert" else "causal-lm")
    assert loaded.tokenizer is not None


def test_clear_errors_for_paths_that_are_not_models(tmp_path):
    with pytest.raises(CompressError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(CompressError, match="no such GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(CompressError, match="no such directory"):
        load_model("./does/not/exist")
    (tmp_path / "config.json").write_text('{"model_type": "not-a-transformer"}')
    with pytest.raises(CompressError, match="its config could not be read"):
        load_model(str(tmp_path))


def test_quantizing_does_not_change_the_parameter_count():
    """A compressed linear counts as its dense weights, so only pruning changes the count a report shows."""
    from compress.models import count_parameters
    from compress.stages import rtn
    from tests.conftest import build_model
    from tests.stages.test_nupes import Context

    model = build_model("llama")
    before = count_parameters(model)
    rtn.apply(model, rtn.RtnConfig(bits=4, group_size=32), Context(torch.randint(3, 320, (2, 16))))
    assert count_parameters(model) == before
