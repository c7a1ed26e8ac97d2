from pathlib import Path

import pytest

from compress.errors import CompressError
from compress.recipe import load_recipe, parse_override, parse_recipe
from compress.registry import STAGES
from compress.stages.rtn import RtnConfig

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.stages


def test_defaults_and_round_trip():
    recipe = parse_recipe("stages:\n  - stage: rtn\n")
    assert recipe.model.name == "smollm2-135m"
    assert isinstance(recipe.stages[0].config, RtnConfig) and recipe.stages[0].config.bits == 4
    assert parse_recipe(recipe.to_yaml()).to_dict() == recipe.to_dict()


MALFORMED = [
    (
        "stages:\n  - stage: nonsense\n",
        f"line 2: stages[0].stage: unknown stage; valid stages are {', '.join(sorted(STAGES))}",  # every registered one
    ),
    (
        "stages:\n  - stage: rtn\n    bits: 9\n",
        "line 3: stages[0].bits: Input should be less than or equal to 8 (got 9)",
    ),
    ("stages:\n  - stage: rtn\n    bits: four\n", "line 3: stages[0].bits: Input should be a valid integer"),
    ("stages:\n  - stage: rtn\n    bitz: 3\n", "line 3: stages[0].bitz: unknown field; did you mean `bits`?"),
    ("modle: x\nstages:\n  - stage: rtn\n", "line 1: modle: unknown field; did you mean `model`? valid"),
    ("stages: []\n", "line 1: stages: List should have at least 1 item"),
    ("model: m\n", "stages: Field required"),
    ("stages:\n  - rtn\n", "line 2: stages[0]: each stage is a mapping"),
    ("data:\n  evaluation:\n    seq_len: 2\nstages:\n  - stage: rtn\n", "line 3: data.evaluation.seq_len"),
    ("export:\n  format: zip\nstages:\n  - stage: rtn\n", "line 2: export.format: Input should be 'packed' or 'dense'"),
    ("stages:\n  - stage: rtn\n   bits: 3\n", "not valid YAML"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("", "the top level must be a mapping"),
]


@pytest.mark.parametrize("text,message", MALFORMED)
def test_malformed_recipes_name_line_and_field(text, message):
    with pytest.raises(CompressError) as raised:
        parse_recipe(text, "bad.yaml")
    assert "bad.yaml" in str(raised.value) or "--set" in str(raised.value)
    assert message in str(raised.value)


def test_all_problems_are_listed_at_once():
    with pytest.raises(CompressError) as raised:
        parse_recipe("seed: x\nstages:\n  - stage: rtn\n    bits: 1\n  - stage: nope\n", "bad.yaml")
    text = str(raised.value)
    assert "line 1: seed" in text and "line 4: stages[0].bits" in text and "line 5: stages[1].stage" in text


def test_overrides():
    recipe = parse_recipe(
        "stages:\n  - stage: rtn\n",
        overrides=dict([parse_override("stages.0.bits=3"), parse_override("model.name=/x/y")]),
    )
    assert recipe.stages[0].config.bits == 3 and recipe.model.name == "/x/y"
    with pytest.raises(CompressError, match="no list item '5'"):
        parse_recipe("stages:\n  - stage: rtn\n", overrides={"stages.5.bits": 3})
    with pytest.raises(CompressError, match="expected KEY=VALUE"):
        parse_override("bits")


def test_an_override_error_names_the_flag_not_the_line_it_replaced():
    text = "stages:\n  - stage: rtn\n    bits: 4\n    group_size: 32\n"
    with pytest.raises(CompressError) as raised:
        parse_recipe(text, "r.yaml", overrides={"stages.0.bits": 12})
    assert "--set stages.0.bits=12: stages[0].bits" in str(raised.value) and "line 3" not in str(raised.value)
    with pytest.raises(CompressError) as raised:  # a whole mapping replaced: its fields are the flag's too
        parse_recipe(text, "r.yaml", overrides={"stages.0": {"stage": "rtn", "bitz": 3}})
    assert '--set stages.0={"stage": "rtn", "bitz": 3}: stages[0].bitz' in str(raised.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(CompressError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")
