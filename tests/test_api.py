"""`compress.run`: a model already in memory, recipes as files, mappings, lists and stage objects, texts as data."""

import re
from pathlib import Path

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.formats.uniform import UniformLinear
from compress.stages.rtn import RtnConfig
from tests.conftest import TINY_DATA, build_model

README = Path(__file__).resolve().parents[1] / "README.md"
TEXTS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and the code compiles." for i in range(200)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def readme_api_example() -> str:
    """The README's Python example (the first ```python block under "Python")."""
    text = README.read_text()
    section = text[text.index("## Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(model_dirs, tmp_path, monkeypatch):
    """The README's script compresses a model already in memory, loads the checkpoint and generates from it; here
    on a tiny model (the names it loads are swapped for the tiny model's directory)."""
    code = readme_api_example()
    assert "compress.run(" in code and "compress.load(" in code and ".generate(" in code
    monkeypatch.chdir(tmp_path)
    code = code.replace('"HuggingFaceTB/SmolLM2-135M"', repr(str(model_dirs["llama"])))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the repository's own README)
    assert (tmp_path / "out" / "smollm2-w4" / "report.json").is_file()
    assert isinstance(namespace["text"], str) and namespace["text"]


def test_a_model_in_memory_is_compressed_in_place(model_dirs, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    model = build_model("llama")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.randint(3, 320, (2, 16))
    before = logits(model, ids)
    result = compress.run(
        [RtnConfig(bits=4, group_size=32)],
        model=model,
        tokenizer=tokenizer,
        calibration=TEXTS,
        evaluation=TEXTS[:100],
        out=tmp_path / "out",
        overrides={"data.calibration.num_samples": 4, "data.calibration.seq_len": 64,
                   "data.evaluation.num_windows": 2, "data.evaluation.seq_len": 64},
    )  # fmt: skip
    assert result.model is model and any(isinstance(m, UniformLinear) for m in model.modules())
    assert result.out == tmp_path / "out"
    assert result.report.after["kl_to_original"] > 0 and result.report.before["perplexity"] > 1
    assert not torch.equal(logits(model, ids), before)
    assert torch.equal(logits(compress.load(tmp_path / "out"), ids), logits(model, ids))
    saved = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "in-memory" in saved and "stage: rtn" in saved


def test_recipes_as_a_file_a_mapping_and_a_list_give_the_same_checkpoint(model_dirs, tmp_path):
    import yaml

    stages = [{"stage": "rtn", "bits": 3, "group_size": 32}]
    mapping = {"model": str(model_dirs["llama"]), "data": TINY_DATA, "stages": stages}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(mapping))
    ids = torch.randint(3, 320, (2, 16))
    outputs = []
    for name, recipe, model in (("file", tmp_path / "r.yaml", None), ("mapping", mapping, None),
                                ("list", stages, str(model_dirs["llama"]))):  # fmt: skip
        overrides = {} if name != "list" else {f"data.{k}.{f}": v for k, d in TINY_DATA.items() for f, v in d.items()}
        result = compress.run(recipe, model=model, out=tmp_path / name, overrides=overrides, evaluate=False)
        outputs.append(logits(result.model, ids))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_api_errors_name_the_problem(model_dirs, tmp_path, tokenizer_dir):
    model = build_model("llama")
    with pytest.raises(CompressError, match="needs its tokenizer"):
        compress.run([{"stage": "rtn"}], model=model, out=tmp_path / "a")
    with pytest.raises(CompressError, match="at least one text, and only strings"):
        compress.run([{"stage": "rtn"}], model=str(model_dirs["llama"]), calibration=[1, 2], out=tmp_path / "b")
    with pytest.raises(CompressError, match="stages\\[0\\].bitz"):
        compress.run([{"stage": "rtn", "bitz": 3}], model=str(model_dirs["llama"]), out=tmp_path / "c")
    with pytest.raises(CompressError, match="cannot stream"):
        from transformers import AutoTokenizer

        compress.run([{"stage": "rtn"}], model=model, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
                     out=tmp_path / "d", stream=True)  # fmt: skip
    assert not any(tmp_path.iterdir())
