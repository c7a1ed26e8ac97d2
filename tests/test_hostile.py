"""A careless or hostile user's inputs: every case ends with exit code 2, a message naming the problem, no
traceback, no output, no leftover run directory, and every file of the user's as it was."""

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from tests.conftest import TINY_DATA

RTN = [{"stage": "rtn", "bits": 4, "group_size": 32}]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with the sha256 of its bytes (folders as 'dir')."""
    return {
        p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def recipe_file(tmp_path: Path, model: Path, out: Path, stages=RTN) -> Path:
    path = tmp_path / "recipe.yaml"
    raw = {"model": str(model), "data": TINY_DATA, "stages": stages, "export": {"out": str(out)}}
    path.write_text(yaml.safe_dump(raw))
    return path


def refused(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "internal error" not in error
    for fragment in fragments:
        assert fragment in error, error
    return error


@pytest.fixture
def model(model_dirs, tmp_path) -> Path:
    """A private copy of the tiny Llama, with a file of the user's beside its weights."""
    copy = Path(shutil.copytree(model_dirs["llama"], tmp_path / "model"))
    (copy / "notes.md").write_text("my notes on this model")
    return copy


def test_force_never_replaces_a_users_directory_holding_a_config(model, tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "thesis.tex").write_text("\\documentclass{article}")
    recipe = recipe_file(tmp_path, model, out)
    before = snapshot(tmp_path)
    refused(capsys, ["run", str(recipe), "--force"], "not a checkpoint written by compress")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["model", "model/out", "."])
def test_the_input_model_is_never_an_output(model, tmp_path, capsys, where):
    out = tmp_path / where if where != "." else tmp_path
    recipe = recipe_file(tmp_path, model, out)
    before = snapshot(tmp_path)
    refused(capsys, ["run", str(recipe), "--force"], "is the input model")
    assert snapshot(tmp_path) == before


def test_a_checkpoint_with_a_users_file_added_is_not_replaced(model, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path, model, out)
    assert main(["run", str(recipe), "--no-eval"]) == 0
    (out / "README.md").write_text("how I made this")
    (out / "extra").mkdir()
    (out / "extra" / "plot.png").write_bytes(b"\x89PNG")
    before = snapshot(tmp_path)
    refused(capsys, ["run", str(recipe), "--force"], "holds files compress did not write (README.md, extra")
    assert snapshot(tmp_path) == before


def test_force_replaces_a_checkpoint_of_ours_and_leaves_nothing_beside_it(model, tmp_path):
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path, model, out)
    assert main(["run", str(recipe), "--no-eval"]) == 0
    (out / "config.json").write_text("{}")  # a damaged checkpoint of ours is still ours
    assert main(["run", str(recipe), "--no-eval", "--force"]) == 0
    assert '"quantization_config"' in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "recipe.yaml"]


@pytest.mark.parametrize(
    ("name", "stages"),
    [(".results.run", RTN), (".results.hesso", [{"stage": "hesso", "target_sparsity": 0.25}])],
)
def test_a_users_directory_named_like_run_state_is_refused_not_deleted(model, tmp_path, capsys, name, stages):
    mine = tmp_path / name
    mine.mkdir()
    (mine / "state.json").write_text('{"mine": true}')
    (mine / "data.csv").write_text("1,2,3")
    recipe = recipe_file(tmp_path, model, tmp_path / "results", stages)
    before = snapshot(tmp_path)
    refused(capsys, ["run", str(recipe)], name, "left alone")
    assert snapshot(tmp_path) == before


def test_a_model_directory_with_only_pickled_weights_is_refused(model, tmp_path, capsys):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    recipe = recipe_file(tmp_path, model, tmp_path / "out")
    before = snapshot(tmp_path)
    refused(capsys, ["validate", str(recipe)], "pytorch_model.bin", "safetensors only")
    refused(capsys, ["run", str(recipe)], "pytorch_model.bin", "safetensors only")
    assert snapshot(tmp_path) == before


def test_a_config_nested_100k_deep_is_refused(model, tmp_path, capsys):
    (model / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    recipe = recipe_file(tmp_path, model, tmp_path / "out")
    refused(capsys, ["validate", str(recipe)], "config")
    refused(capsys, ["run", str(recipe)], "config")
    assert not (tmp_path / "out").exists()


BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
    + ["stages: [{stage: rtn}]"]
)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (BILLION_LAUGHS, "YAML aliases"),
        ("a: &a x\nb: [" + "*a, " * 150_000 + "*a]\nstages: [{stage: rtn}]\n", "YAML aliases"),
        ("stages: [{stage: rtn, bits: '" + "9" * 50_000_000 + "'}]\n", "at most 1048576"),
        ("stages: [{stage: rtn, bits: '" + "9" * 100_000 + "'}]\n", "characters)"),
    ],
    ids=["billion-laughs", "150k-aliases", "50MB-value", "100k-value"],
)
def test_recipe_bombs_are_refused_quickly_with_a_short_message(tmp_path, capsys, text, fragment):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    error = refused(capsys, ["validate", str(path)], fragment)
    assert len(error) < 2000


@pytest.mark.parametrize("case", ["long-name", "under-a-file", "read-only", "no-space"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(model, tmp_path, capsys, monkeypatch, case):
    import shutil as shell

    from compress import pipeline

    if case == "long-name":
        out, fragment = tmp_path / ("x" * 250), "the file system allows"
    elif case == "under-a-file":
        (tmp_path / "plain").write_text("a file")
        out, fragment = tmp_path / "plain" / "out", "is a file"
    elif case == "read-only":
        out, fragment = tmp_path / "locked" / "out", "cannot create anything"
        (tmp_path / "locked").mkdir()
        real_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):  # root ignores permission bits; a read-only file system does not
            if self.parent == tmp_path / "locked":
                raise PermissionError(13, "Read-only file system")
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    else:
        out, fragment = tmp_path / "out", "MiB free"
        monkeypatch.setattr(shell, "disk_usage", lambda path: shell._ntuple_diskusage(10**12, 10**12 - 1024, 1024))
    recipe = recipe_file(tmp_path, model, out)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    before = snapshot(tmp_path)
    refused(capsys, ["run", str(recipe)], fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("num_hidden_layers", 1e9, "num_hidden_layers is 1000000000.0"),
        ("num_hidden_layers", 10**9, "num_hidden_layers is 1000000000"),
        ("hidden_size", -64, "hidden_size is -64"),
        ("intermediate_size", "128", "intermediate_size is '128'"),
        ("num_attention_heads", 0, "num_attention_heads is 0"),
        ("vocab_size", True, "vocab_size is True"),
    ],
)
def test_an_absurd_config_is_refused_by_its_bounds_first(model, tmp_path, capsys, field, value, fragment):
    import json
    import time

    config = json.loads((model / "config.json").read_text())
    config[field] = value
    (model / "config.json").write_text(json.dumps(config))
    recipe = recipe_file(tmp_path, model, tmp_path / "out")
    started = time.perf_counter()
    for command in (["validate", str(recipe)], ["run", str(recipe)]):
        refused(capsys, command, "config.json")
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a" * 300, "org/" + "a" * 300, "x/" * 3000])
def test_an_absurd_model_name_is_refused(tmp_path, capsys, name):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": name, "stages": RTN, "export": {"out": str(tmp_path / "out")}}))
    error = refused(capsys, ["validate", str(recipe)], "model")
    assert len(error) < 1500


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tokenizer_dir, tmp_path, capsys):
    import transformers

    from tests.conftest import tiny_config

    config = tiny_config("llama")
    config.vocab_size = 100  # the tokenizer has 320 tokens
    small = tmp_path / "small"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(small)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(small)
    recipe = recipe_file(tmp_path, small, tmp_path / "out")
    refused(capsys, ["run", str(recipe)], "tokenizer has 320 tokens but the embedding only 100 rows")
    assert not (tmp_path / "out").exists()


def test_a_config_that_does_not_match_the_weights_is_refused(model, tmp_path, capsys):
    import json

    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96  # within bounds, but the weights hold 128
    (model / "config.json").write_text(json.dumps(config))
    refused(capsys, ["run", str(recipe_file(tmp_path, model, tmp_path / "out"))], "do not match its config.json")
    assert not (tmp_path / "out").exists()
