"""Every shipped recipe runs end to end on a tiny model (data scaled down) and its checkpoint loads back."""

from pathlib import Path

import pytest
import torch
import yaml

import compress
from compress import pipeline
from compress.recipe import load_recipe
from compress.registry import STAGES
from tests.conftest import tiny_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
SMALL_DATA = {
    "data.calibration.num_samples": 8,
    "data.calibration.seq_len": 64,
    "data.evaluation.num_windows": 2,
    "data.evaluation.seq_len": 64,
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_on_a_tiny_model(path, model_dirs, tmp_path):
    out = tmp_path / "out"
    overrides = {"model.name": str(model_dirs["llama"]), "export.out": str(out), **SMALL_DATA}
    stages = yaml.safe_load(path.read_text())["stages"]
    for index, stage in enumerate(stages):
        if stage["stage"] == "pv_tuning":
            overrides[f"stages.{index}.validation_windows"] = 2
            if "teacher" in stage:
                overrides[f"stages.{index}.teacher"] = str(model_dirs["llama"])
        if stage["stage"] == "hesso":  # the schedule scaled down as the data is
            schedule = {"warmup_steps": 1, "steps_per_period": 2, "recovery_steps": 2, "batch_size": 2}
            overrides.update({f"stages.{index}.{key}": value for key, value in schedule.items()})
    if STAGES[stages[0]["stage"]].needs_quantized:  # the recipe starts from a compressed checkpoint: make one
        base = tmp_path / "base"
        pipeline.run(tiny_recipe(model_dirs["llama"], base, [{"stage": "nupes", "group_size": 32}]), evaluate=False)
        overrides["model.name"] = str(base)
    result = pipeline.run(load_recipe(path, overrides))
    assert result.report.after["perplexity"] > 1
    ids = torch.randint(3, 320, (1, 16))
    with torch.no_grad():
        assert torch.equal(compress.load(out)(input_ids=ids).logits, result.model(input_ids=ids).logits)
