"""Every shipped recipe runs end to end on a tiny model (data scaled down) and its checkpoint loads back."""

from pathlib import Path

import pytest
import torch

import compress
from compress import pipeline
from compress.recipe import load_recipe

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
    result = pipeline.run(load_recipe(path, overrides))
    assert result.report.after["perplexity"] > 1
    ids = torch.randint(3, 320, (1, 16))
    with torch.no_grad():
        assert torch.equal(compress.load(out)(input_ids=ids).logits, result.model(input_ids=ids).logits)
