"""What a run's report tells a person: a summary first, a sample of both models, layers by kind, a picture."""

import json
import xml.etree.ElementTree as ET

import pytest

from compress import pipeline
from compress.plot import line_chart_svg
from compress.recipe import parse_recipe
from tests.conftest import TINY_DATA, build_model


@pytest.fixture(scope="module")
def run(model_dirs, tmp_path_factory):
    import yaml

    out = tmp_path_factory.mktemp("report") / "out"
    raw = {"model": str(model_dirs["llama"]), "data": TINY_DATA, "stages": [{"stage": "rtn", "bits": 4}],
           "export": {"out": str(out)}}  # fmt: skip
    recipe = parse_recipe(yaml.safe_dump(raw), "tiny.yaml", {"stages.0.group_size": 32})
    return pipeline.run(recipe), out


def test_the_report_starts_with_a_summary_and_records_the_overrides(run):
    result, out = run
    markdown = (out / "report.md").read_text()
    lines = markdown.splitlines()
    assert lines[0].startswith("# Compression report")
    summary = lines[2]
    assert "bits per weight" in summary and "x smaller" in summary and "perplexity" in summary.lower()
    assert "KL to the original" in summary and "decode" in summary
    assert "`--set stages.0.group_size=32`" in markdown
    saved = json.loads((out / "report.json").read_text())
    assert saved["overrides"] == {"stages.0.group_size": 32}
    assert "group_size: 32" in (out / "recipe.yaml").read_text()


def test_the_report_shows_both_models_continuing_one_prompt(run):
    result, out = run
    samples = json.loads((out / "report.json").read_text())["samples"]
    assert samples["prompt"] == "The capital of France is"
    assert isinstance(samples["original"], str) and isinstance(samples["compressed"], str)
    assert "## A greedy sample" in (out / "report.md").read_text()
    assert "compressed:" in result.report.to_text()


def test_layers_are_summarised_by_kind_with_the_worst_named(run):
    result, out = run
    markdown = (out / "report.md").read_text()
    layer_rows = [line for line in markdown.splitlines() if line.startswith("| model.layers.")]
    assert len(layer_rows) == 14  # every layer, folded away under <details>
    assert markdown.index("<details>") < markdown.index(layer_rows[0])
    assert "| self_attn.q_proj | 2 |" in markdown and "Largest relative weight errors" in markdown
    errors = {n: layer["relative_error"] for n, layer in result.report.layers.items()}
    worst = max(errors, key=errors.get)
    assert result.report.worst_layers()[0] == (worst, errors[worst])
    ET.fromstring((out / "report.svg").read_text())  # well-formed
    assert "report.svg" in json.loads((out / "report.json").read_text())["files"]


def test_one_size_definition(run):
    """report.json's size is the weight files; the original's is its tensors as float16."""
    result, out = run
    size = json.loads((out / "report.json").read_text())["size"]
    assert size["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert size["directory_bytes"] > size["checkpoint_bytes"]
    original = build_model("llama")
    tensors = {t.data_ptr(): t.numel() for t in original.state_dict().values()}  # tied embeddings once
    assert size["original_bytes"] == 2 * sum(tensors.values())


def test_the_chart_draws_every_series_and_keeps_the_legend_outside_the_data():
    series = {"a": [(0, 0.01), (1, 0.02), (2, 0.5)], "b": [(0, 0.03), (1, float("nan")), (2, 0.04)]}
    root = ET.fromstring(line_chart_svg(series, "t", "block", "error"))
    namespace = "{http://www.w3.org/2000/svg}"
    polylines = root.findall(f"{namespace}polyline")
    assert len(polylines) == 2
    assert len(polylines[1].get("points").split()) == 2  # the NaN point is left out
    frame = root.find(f"{namespace}rect[@stroke]")
    right_edge = float(frame.get("x")) + float(frame.get("width"))
    for polyline in polylines:
        assert all(float(p.split(",")[0]) <= right_edge for p in polyline.get("points").split())
    legend = [t for t in root.findall(f"{namespace}text") if t.text in ("a", "b")]
    assert len(legend) == 2 and all(float(t.get("x")) > right_edge for t in legend)
    assert "log scale" in "".join(t.text or "" for t in root.iter())  # 0.01 .. 0.5 spans more than 20x
