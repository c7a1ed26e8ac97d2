"""`compress validate` and `compress schema`: recipes checked against the model's shapes before any heavy work."""

import json
from pathlib import Path

import jsonschema
import yaml

from compress.cli import main
from compress.registry import STAGES
from tests.conftest import TINY_DATA

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, model_dir: Path, stages: list, out: Path, **extra) -> Path:
    recipe = {"model": str(model_dir), "data": TINY_DATA, "stages": stages, "export": {"out": str(out)}, **extra}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_valid_recipe_output(model_dirs, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], [{"stage": "rtn", "bits": 4, "group_size": 32}], tmp_path)
    assert main(["validate", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "valid for" in printed and "LlamaForCausalLM" in printed and "rtn (14 layers)" in printed


def problems_of(recipe: Path, capsys) -> str:
    assert main(["validate", str(recipe)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_group_size_must_divide_the_layers(model_dirs, tmp_path, capsys):
    # hidden 64 and intermediate 128: 48 divides neither
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], [{"stage": "nupes", "group_size": 48}], tmp_path / "o")
    error = problems_of(recipe, capsys)
    assert "stages[0].group_size" in error and "48 does not divide" in error and "r.yaml, line" in error
    assert "model.layers.0.self_attn.q_proj (64)" in error and "more" in error


def test_every_problem_is_listed_at_once(model_dirs, tmp_path, capsys):
    data = {"calibration": {"seq_len": 1024}, "evaluation": {"source": str(tmp_path / "missing.txt")}}
    stages = [{"stage": "rtn", "group_size": 48}, {"stage": "nupes", "ignore": ["mlp"]}]
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], stages, tmp_path / "o", data=data)
    error = problems_of(recipe, capsys)
    assert "stages[0].group_size: 48 does not divide" in error
    assert (
        "stages[1]: nupes would quantize 8 layers (first model.layers.0.self_attn.q_proj) that stages[0] (rtn)" in error
    )
    assert "data.calibration.seq_len: exceeds the model's max_position_embeddings 512 (got 1024)" in error
    assert "data.evaluation.source: no such file" in error


def test_stages_can_split_the_layers(model_dirs, tmp_path, capsys):
    stages = [{"stage": "rtn", "ignore": ["mlp"], "group_size": 32}, {"stage": "nupes", "ignore": ["self_attn"]}]
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], stages, tmp_path / "o")
    assert main(["validate", str(recipe)]) == 0
    assert "rtn (8 layers), nupes (6 layers)" in capsys.readouterr().out


def test_a_stage_must_select_something(model_dirs, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], [{"stage": "rtn", "ignore": ["."]}], tmp_path / "o")
    assert "stages[0].targets: selects no layer of the model" in problems_of(recipe, capsys)


def test_bad_regex_names_the_field(model_dirs, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], [{"stage": "rtn", "ignore": ["("]}], tmp_path / "o")
    error = problems_of(recipe, capsys)
    assert "stages[0].ignore" in error and "not a valid regular expression" in error


def test_stage_needing_a_quantized_model(model_dirs, tmp_path, capsys, monkeypatch):
    """Order rule: a stage that works on compressed layers needs a quantizing stage before it."""
    from compress.registry import StageEntry
    from compress.stages.base import LayerSelection

    entry = StageEntry("tune", LayerSelection, lambda *a: None, needs_quantized=True)
    monkeypatch.setitem(STAGES, "tune", entry)
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], [{"stage": "tune"}], tmp_path / "o")
    assert "stages[0].stage: tune works on compressed layers; put a quantizing stage" in problems_of(recipe, capsys)
    ordered = write(tmp_path / "s.yaml", model_dirs["llama"], [{"stage": "rtn", "group_size": 32}, {"stage": "tune"}],
                    tmp_path / "o")  # fmt: skip
    assert main(["validate", str(ordered)]) == 0


def test_run_refuses_what_validate_refuses(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], [{"stage": "rtn", "group_size": 48}], out)
    assert main(["run", str(recipe)]) == 2
    assert "48 does not divide" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_validate_uses_overrides(model_dirs, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], [{"stage": "rtn", "group_size": 32}], tmp_path / "o")
    assert main(["validate", str(recipe), "--set", "stages.0.group_size=48"]) == 2
    assert main(["validate", str(recipe), "--model", str(model_dirs["gpt2"])]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out


def test_schema_accepts_every_shipped_recipe_and_rejects_bad_ones(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    variants = [v["then"] for v in schema["properties"]["stages"]["items"]["allOf"]]
    assert sorted(v["properties"]["stage"]["const"] for v in variants) == sorted(STAGES)
    validator = jsonschema.Draft202012Validator(schema)
    # a typo in a field of one stage is reported for that stage only, naming the field
    errors = list(validator.iter_errors({"stages": [{"stage": "nupes", "group_szie": 64}]}))
    assert len(errors) == 1 and "group_szie" in errors[0].message and errors[0].schema.get("title") == "stage nupes"
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path.name
    bad = [
        {"stages": [{"stage": "rtn", "bits": 9}]},
        {"stages": [{"stage": "nupes", "mode": "sometimes"}]},
        {"stages": [{"stage": "rtn", "colour": 1}]},
        {"stages": [{"stage": "quantum"}]},
        {"stages": []},
        {"seed": -1, "stages": [{"stage": "rtn"}]},
        {"stages": [{"stage": "rtn"}], "export": {"format": "zip"}},
        {"stages": [{"stage": "rtn"}], "data": {"calibration": [{"source": "generated", "wieght": 2}]}},
        {"stages": [{"stage": "rtn"}], "data": {"calibration": {"source": "generated", "generation": {"top_p": 2}}}},
    ]
    mixtures = [{"source": "generated", "weight": 3, "generation": {"temperature": 0.8}}, {"source": "notes.txt"}]
    for data in ({"calibration": mixtures}, {"calibration": {"num_samples": 64, "sources": mixtures}}):
        assert not list(validator.iter_errors({"stages": [{"stage": "rtn"}], "data": data})), data
    for recipe in bad:
        assert list(validator.iter_errors(recipe)), recipe
