"""A loaded checkpoint runs its compressed layers through the kernels, keeps its head in float16 as stored, and
gives the logits of the pure-PyTorch path; `compress generate` prints text and speeds."""

import pytest
import torch

from compress import load, pipeline
from compress.cli import main
from compress.formats.base import QuantizedLinear
from compress.formats.embedding import QuantizedEmbedding
from compress.formats.uniform import UniformLinear
from compress.runtime import kernels, release
from compress.runtime.layers import HalfLinear
from tests.conftest import tiny_recipe

STAGES = {
    "uniform": [{"stage": "rtn", "bits": 3, "group_size": 32}],
    "power": [{"stage": "nupes", "mode": "data-free", "bits": 2, "group_size": 32}],
    "codebook": [{"stage": "jlcm", "code_bits": 6, "vector_dim": 2, "rows_per_group": 32, "steps": 0}],
    # the output head on an 8-bit grid, and the tied embedding reading its rows from the head's codes
    "uniform, head": [{"stage": "rtn", "bits": 3, "group_size": 32}, {"stage": "head", "bits": 8, "group_size": 32}],
}


@pytest.fixture(scope="module", params=sorted(STAGES))
def checkpoint(request, model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    pipeline.run(tiny_recipe(model_dirs["llama"], out, STAGES[request.param]), evaluate=False)
    return out


def test_loaded_checkpoint_gives_the_reference_logits(checkpoint, monkeypatch):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = load(checkpoint)
    assert all("kernel" in vars(m) for m in model.modules() if isinstance(m, QuantizedLinear))
    monkeypatch.setenv(kernels.SWITCH, "0")  # the operators are chosen at load: this model runs the references
    reference_model = load(checkpoint)
    with torch.no_grad():
        fast = model(ids).logits
        reference = reference_model(ids).logits
        released = release(load(checkpoint))
        for module in released.modules():
            vars(module).pop("kernel", None)
        dense = released(ids).logits  # every layer through F.linear(x, dequantize()), the head in float32
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast, dense, rtol=1e-4, atol=1e-4)
    assert not isinstance(released.get_output_embeddings(), HalfLinear)


def test_the_head_stays_float16_and_generation_runs(checkpoint):
    model = load(checkpoint)
    head = model.get_output_embeddings()
    if checkpoint.parent.name.startswith("uniform, head"):  # compressed by the head stage: computed from its codes
        assert isinstance(head, UniformLinear) and head.bits == 8 and "kernel" in vars(head)
        assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    else:
        assert isinstance(head, HalfLinear) and head.weight.dtype == torch.float16
    with torch.no_grad():
        ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 8)


def test_generate_command_prints_text_and_speeds(checkpoint, model_dirs, capsys):
    for source in (checkpoint, model_dirs["llama"]):
        assert main(["generate", str(source), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
        printed = capsys.readouterr().out
        assert "decode" in printed and "tokens/s" in printed and "prefill" in printed and "resident memory" in printed
    assert main(["generate", str(checkpoint), "--max-new-tokens", "0"]) == 2


def test_generation_never_builds_a_dense_weight(checkpoint, monkeypatch):
    def refuse(self):
        raise AssertionError(f"{type(self).__name__} built its dense weight")

    model = load(checkpoint)
    formats = {type(m) for m in model.modules() if isinstance(m, QuantizedLinear)}
    assert formats
    for format_class in formats:  # each format defines its own dequantize
        monkeypatch.setattr(format_class, "dequantize", refuse)
    with torch.no_grad():
        model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        model(torch.randint(0, 300, (1, 40)))  # a prefill, through the tiles


def test_eval_reports_the_same_quality_with_and_without_the_kernels(checkpoint, capsys, monkeypatch):
    import json

    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv(kernels.SWITCH, switch)
        window = ["--num-windows", "2", "--seq-len", "32", "--batch-size", "2"]
        assert main(["eval", str(checkpoint), *window, "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    compiled, reference = results
    assert compiled["tokens"] == reference["tokens"] > 0
    assert compiled["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    assert compiled["decode_tokens_per_second"] > 0 and compiled["prefill_tokens_per_second"] > 0
