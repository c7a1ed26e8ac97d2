"""Numeric faults stop the run naming the tensor, layer or step, and leave the last good output untouched;
the same recipe and seed give byte-identical checkpoints; --force replaces only checkpoints."""

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from compress import pipeline
from compress.cli import main
from compress.errors import CompressError, NumericError
from tests.conftest import TINY_DATA, tiny_recipe


def digests(directory: Path, skip=("report.json", "report.md")) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def poisoned_model(model_dir: Path, tmp_path: Path, tensor: str) -> Path:
    target = Path(shutil.copytree(model_dir, tmp_path / "poisoned"))
    tensors = load_file(str(target / "model.safetensors"))
    tensors[tensor].view(-1)[37] = float("nan")
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_nan_in_weights_names_the_tensor_and_keeps_the_last_good_output(model_dirs, tmp_path, capsys, tensor):
    out = tmp_path / "out"
    stages = [{"stage": "rtn", "bits": 4, "group_size": 32}]
    pipeline.run(tiny_recipe(model_dirs["llama"], out, stages), evaluate=False)
    good = digests(out, skip=())
    recipe = tmp_path / "r.yaml"
    poisoned = poisoned_model(model_dirs["llama"], tmp_path, tensor)
    raw = {"model": str(poisoned), "data": TINY_DATA, "stages": stages, "export": {"out": str(out)}}
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe), "--force"]) == 2
    error = capsys.readouterr().err
    assert f"tensor {tensor} holds 1 NaN or infinite values" in error and "Traceback" not in error
    assert digests(out, skip=()) == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_diverging_loss_names_the_block_and_step(model_dirs, tmp_path):
    out = tmp_path / "out"
    stage = {"stage": "nupes", "mode": "data-driven", "group_size": 32, "steps": 4, "scale_learning_rate": 1e30}
    with pytest.raises(NumericError, match=r"nupes: block model\.layers\.0: .*loss became (nan|inf) at step 2"):
        pipeline.run(tiny_recipe(model_dirs["llama"], out, [stage]), evaluate=False)
    assert not out.exists()


def test_same_recipe_and_seed_give_identical_checkpoints(model_dirs, tmp_path):
    stage = {"stage": "nupes", "mode": "data-driven", "bits": 3, "group_size": 32, "steps": 4}
    out = tmp_path / "out"
    pipeline.run(tiny_recipe(model_dirs["llama"], out, [stage], seed=3), evaluate=False)
    first = digests(out)
    pipeline.run(tiny_recipe(model_dirs["llama"], out, [stage], seed=3), force=True, evaluate=False)
    assert digests(out) == first
    assert len(first) >= 5


def test_force_replaces_only_checkpoints(model_dirs, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    recipe = tiny_recipe(model_dirs["llama"], precious, [{"stage": "rtn", "group_size": 32}])
    with pytest.raises(CompressError, match="not a checkpoint written by compress .*; --force only"):
        pipeline.run(recipe, force=True, evaluate=False)
    assert (precious / "thesis.txt").read_text() == "keep me"


def test_output_cannot_be_the_working_directory(model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    for out in (".", "..", str(tmp_path.parent)):
        raw = {"model": str(model_dirs["llama"]), "stages": [{"stage": "rtn"}], "export": {"out": out}}
        recipe.write_text(yaml.safe_dump(raw))
        assert main(["run", str(recipe), "--force"]) == 2
        error = capsys.readouterr().err
        assert (
            "export.out: must name a directory of its own" in error or "is the working directory or one above" in error
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_no_pickle_anywhere():
    """Checkpoints and caches are safetensors or JSON; nothing in the package may unpickle."""
    root = Path(__file__).resolve().parents[1]
    for path in list((root / "compress").rglob("*.py")) + list((root / "scripts").rglob("*.py")):
        text = path.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, path
