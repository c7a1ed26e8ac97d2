"""PV-Tuning: the distillation loss, the code-update rule, the stage on a tiny model, and 2-process parity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import compress
from compress import pipeline
from compress.cli import main
from compress.formats.base import QuantizedLinear
from compress.solvers.pv import largest_changes, teacher_topk, topk_kl
from tests.conftest import TINY_DATA, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_topk_kl_is_the_exact_kl_when_k_covers_the_vocabulary():
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 5, 50), torch.randn(3, 5, 50)
    logp, index = teacher_topk(teacher, 50)
    p = torch.softmax(teacher, -1)
    exact = (p * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1).mean()
    assert topk_kl(student, logp.float(), index) == pytest.approx(float(exact), abs=2e-3)  # float16 teacher
    assert float(topk_kl(teacher, *teacher_topk(teacher, 8))) == pytest.approx(0.0, abs=2e-3)
    small = float(topk_kl(student, *teacher_topk(teacher, 8)))
    assert 0 <= small <= float(exact) + 2e-3  # coarsening to k + 1 outcomes can only lower a KL


def test_largest_changes_selects_the_fraction_that_moved_most():
    current = torch.zeros(10, 100)
    proposed = torch.zeros(10, 100)
    proposed.view(-1)[torch.arange(0, 1000, 97)] = torch.arange(1, 12).float()  # 11 moved weights
    mask = largest_changes(proposed, current, 0.005)  # 5 of 1000
    assert int(mask.sum()) == 5
    assert set(proposed[mask].tolist()) == {7.0, 8.0, 9.0, 10.0, 11.0}
    assert largest_changes(proposed, current, 1.0) is None


def pv_stages(**settings):
    stage = {"stage": "pv_tuning", "steps": 12, "batch_size": 2, "eval_every": 4, "validation_windows": 2,
             "learning_rate": 1e-3, "norm_learning_rate": 1e-3, "code_learning_rate": 1e-2, **settings}  # fmt: skip
    return [{"stage": "nupes", "bits": 2, "group_size": 32}, stage]


def test_tuning_lowers_the_held_out_kl_and_keeps_the_format(model_dirs, tmp_path):
    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, pv_stages()), evaluate=True)
    metrics = result.report.stages[1].metrics
    validation = metrics["validation"]
    best = min(validation, key=lambda v: v["kl"])
    assert best["kl"] < validation[0]["kl"] * 0.97 and metrics["best_step"] == best["step"] > 0
    # the format, settings and bits are those nupes wrote; nothing of the training is left in the checkpoint
    layers = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 14 and all(m.format == "power" and m.bits == 2 for m in layers.values())
    assert result.report.after["bits_per_weight"] == pytest.approx(2 + 18 / 32 + 16 / (64 * 128), rel=0.02)
    assert not any("weight_probe" in name for name in result.model.state_dict())
    ids = torch.randint(3, 320, (1, 16))
    with torch.no_grad():
        assert torch.equal(compress.load(out)(input_ids=ids).logits, result.model(input_ids=ids).logits)


@pytest.mark.parametrize("mode", ["pv", "ste"])
def test_one_step_reencodes_one_percent_of_codes_or_all(model_dirs, tmp_path, mode):
    from accelerate import Accelerator

    from compress.models import load_model
    from compress.stages.pv_tuning import PvTuningConfig, _Trainer

    model = pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / "b", pv_stages()[:1]), evaluate=False).model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    codes = {n: m.codes().clone() for n, m in layers.items()}
    windows = torch.randint(3, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp, index = teacher_topk(load_model(str(model_dirs["llama"])).model(input_ids=windows).logits[:, :-1], 16)
    config = PvTuningConfig(mode=mode, learning_rate=0.0, norm_learning_rate=0.0, code_learning_rate=0.05)
    trainer = _Trainer(model, layers, config, Accelerator())
    trainer.step(windows, logp, index)
    fraction = sum(int((m.codes() != codes[n]).sum()) for n, m in layers.items()) / sum(
        map(torch.numel, codes.values())
    )
    if mode == "pv":
        assert 0.002 < fraction <= 0.01
    else:
        assert fraction > 0.05
    trainer.finish()


def test_order_rule_and_compressed_checkpoints(model_dirs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    raw = {"model": str(model_dirs["llama"]), "data": TINY_DATA, "stages": [{"stage": "pv_tuning"}]}
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(recipe)]) == 2
    assert "pv_tuning works on compressed layers" in capsys.readouterr().err
    base = tmp_path / "base"
    pipeline.run(tiny_recipe(model_dirs["llama"], base, [{"stage": "rtn", "group_size": 32}]), evaluate=False)
    raw["model"] = str(base)
    raw["stages"][0]["teacher"] = str(model_dirs["llama"])
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(recipe)]) == 0  # a compressed checkpoint has compressed layers already
    assert "pv_tuning" in capsys.readouterr().out


def test_two_processes_match_one(model_dirs, tmp_path):
    """`accelerate launch --cpu --num_processes 2` splits each batch between the processes and averages their
    gradients: the result matches one process with the same global batch, within float noise."""
    stages = pv_stages(steps=6, eval_every=3, code_learning_rate=1e-3)
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        recipe = tmp_path / f"r{processes}.yaml"
        raw = {"model": str(model_dirs["llama"]), "data": TINY_DATA, "stages": stages, "export": {"out": str(out)}}
        recipe.write_text(yaml.safe_dump(raw))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        command = launch + ["-m", "compress", "run", str(recipe), "--no-eval"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = json.loads((out / "report.json").read_text())["stages"][1]["metrics"]["validation"]
    one, two = runs[1], runs[2]
    assert [v["step"] for v in one] == [v["step"] for v in two]
    for a, b in zip(one, two, strict=True):
        assert b["kl"] == pytest.approx(a["kl"], rel=0.02)
    assert one[-1]["kl"] < one[0]["kl"]


def test_a_killed_training_resumes_to_the_same_checkpoint(model_dirs, tmp_path, monkeypatch):
    from compress.stages import pv_tuning

    stages = pv_stages(steps=8, eval_every=2, checkpoint_every=2)
    reference = tmp_path / "reference"
    pipeline.run(tiny_recipe(model_dirs["llama"], reference, stages), evaluate=False)

    out = tmp_path / "out"
    step = pv_tuning._Trainer.step
    calls = []

    def killed_at_the_sixth_step(self, *args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # as a kill after step 5; the last checkpoint is that of step 4
        return step(self, *args)

    monkeypatch.setattr(pv_tuning._Trainer, "step", killed_at_the_sixth_step)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(tiny_recipe(model_dirs["llama"], out, stages), evaluate=False)
    checkpoint = tmp_path / ".out.pv_tuning"
    assert (checkpoint / "state.json").is_file() and json.loads((checkpoint / "state.json").read_text())["step"] == 4
    assert not out.exists()

    resumed_steps = []

    def counted(self, *args):
        resumed_steps.append(1)
        return step(self, *args)

    monkeypatch.setattr(pv_tuning._Trainer, "step", counted)
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, stages), evaluate=False)
    assert len(resumed_steps) == 4  # steps 5 to 8 only
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert (
        result.report.stages[1].metrics["validation"]
        == json.loads((reference / "report.json").read_text())["stages"][1]["metrics"]["validation"]
    )
    assert not checkpoint.exists()


def test_tuning_works_on_codebook_layers(model_dirs, tmp_path):
    """The same stage, unchanged, on `codebook` (jlcm) layers: held-out KL falls, format and size stay."""
    jlcm = {
        "stage": "jlcm",
        "code_bits": 3,
        "vector_dim": 2,
        "rows_per_group": 16,
        "steps": 0,  # 1.5 bits: room
        "outlier_threshold": 1.5,
        "max_kept_columns": 2,
    }  # and kept columns, which the P-step trains too
    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / "jlcm", [jlcm]), evaluate=False)
    kept = {n: m.column_weights.clone() for n, m in result.model.named_modules()
            if isinstance(m, QuantizedLinear) and m.column_indices is not None}  # fmt: skip
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [jlcm, pv_stages()[1]]), evaluate=False)
    validation = result.report.stages[1].metrics["validation"]
    assert min(v["kl"] for v in validation) < validation[0]["kl"] * 0.97
    layers = [m for m in result.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.format == "codebook" and m.code_bits == 3 for m in layers)
    tuned = dict(result.model.named_modules())
    assert kept and all(tuned[n].column_weights.shape == w.shape for n, w in kept.items())
    assert any(not torch.equal(tuned[n].column_weights, w) for n, w in kept.items())
    ids = torch.randint(3, 320, (1, 16))
    with torch.no_grad():
        assert torch.equal(compress.load(out)(input_ids=ids).logits, result.model(input_ids=ids).logits)
