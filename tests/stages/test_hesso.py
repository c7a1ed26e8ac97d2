"""HESSO: the schedule and selection math, the invariants of training (groups shrink to exactly zero over their
period and stay there; nothing is pruned at step 1), the asked sparsity, and checkpoints that load back."""

import json

import pytest
import torch

import compress
from compress import pipeline
from compress.errors import CompressError
from compress.prune.groups import scale_groups, zero_groups
from compress.prune.structure import find_groups
from compress.solvers.hesso import (
    Schedule,
    criteria,
    cumulative_target,
    output_change,
    round_kept,
    saliency,
    select,
    shrink_factor,
)
from compress.stages import hesso
from tests.conftest import build_model, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_phases_and_linear_shrink_to_exactly_zero():
    schedule = Schedule(warmup_steps=3, periods=2, steps_per_period=4, recovery_steps=5)
    assert schedule.total_steps == 16 and schedule.pruning_ends == 11
    assert [schedule.phase(s) for s in (1, 3, 4, 7, 8, 11, 12)] == [None, None, (0, 1), (0, 4), (1, 1), (1, 4), None]
    value, held = 1.0, []
    for k in range(1, 5):
        value *= shrink_factor(k, 4)
        held.append(value)
    assert held[:3] == pytest.approx([0.75, 0.5, 0.25]) and held[3] == 0.0
    assert [cumulative_target(100, 0.3, p, 3) for p in range(3)] == [10, 20, 30]


def test_saliency_normalises_each_criterion_and_drops_uninformative_ones():
    weights = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]])
    raw = criteria(weights, gradient=torch.zeros(3, 2), direction=-weights)
    assert raw["magnitude"].tolist() == [5.0, 1.0, 1.0] and raw["taylor"].tolist() == [0.0, 0.0, 0.0]
    assert raw["cosine"].tolist() == pytest.approx([0.0, 0.0, 0.0])  # the update pulls every group to zero
    scores = saliency(raw, {"magnitude": 1.0, "taylor": 1.0, "cosine": 0.0})
    assert scores.tolist() == pytest.approx([1.0, 0.2, 0.2])


def test_output_change_is_the_root_mean_square_of_each_groups_contribution():
    inputs, columns = torch.randn(50, 3, 4), torch.randn(3, 8, 4)  # 50 tokens, 3 groups of 4 columns, 8 outputs
    gram = torch.einsum("ngi,ngj->gij", inputs, inputs) / 50
    slow = [(inputs[:, g] @ columns[g].T).pow(2).sum(-1).mean().sqrt() for g in range(3)]
    assert output_change(columns, gram).tolist() == pytest.approx(torch.stack(slow).tolist(), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_output_criterion_measures_the_layer_output_change_when_a_group_is_zeroed(family):
    """The hooks and the column layout: for every family of groups (heads as KV groups with their query heads),
    zeroing group g changes its output projection's output by exactly the criterion's root mean square."""
    model = build_model(family)
    ids = torch.randint(3, 320, (2, 12))
    families = find_groups(model, ["mlp_channels", "attention_heads"], "kv")
    config = hesso.HessoConfig(criteria={"output": 1.0})
    measured = hesso._Pruner(model, families, config, None, None, lambda: model(input_ids=ids))._output_change()
    for family_, criterion in zip(families, measured, strict=True):
        projection = next(m for m in family_.members if m.dim == 1)
        outputs = []
        module = model.get_submodule(projection.module)
        handle = module.register_forward_hook(lambda m, a, out, seen=outputs: seen.append(out))
        saved = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            model(input_ids=ids)
            for g in range(family_.count):
                scale_groups(model, family_, torch.tensor([g]), 0.0)
                model(input_ids=ids)
                for name, parameter in model.named_parameters():
                    parameter.copy_(saved[name])
        handle.remove()
        changes = [(outputs[0] - o).pow(2).sum(-1).mean().sqrt() for o in outputs[1:]]
        assert criterion.tolist() == pytest.approx(torch.stack(changes).tolist(), rel=1e-4, abs=1e-6)
        assert criterion.std() > 0


def test_selection_keeps_one_group_per_block_and_rounds_widths():
    scores = torch.tensor([0.1, 0.2, 0.3, 5.0, 0.05, 0.06])
    owner = torch.tensor([0, 0, 0, 0, 1, 1])
    pruned = torch.tensor([False, False, False, False, False, True])
    chosen = select(scores, owner, pruned, count=4)
    assert chosen.tolist() == [True, True, True, False, False, False]  # family 1 keeps its last group
    scores = torch.arange(16.0)
    owner = torch.zeros(16, dtype=torch.long)
    chosen = select(scores, owner, torch.zeros(16, dtype=torch.bool), count=5)
    rounded = round_kept(scores, owner, torch.zeros(16, dtype=torch.bool), chosen, multiple=4)
    assert int(rounded.sum()) == 4 and rounded[:4].all()  # keeps 12 (a multiple of 4), not 11


def run(model_dir, tmp_path, name="out", **settings):
    stage = {"stage": "hesso", "warmup_steps": 2, "pruning_periods": 2, "steps_per_period": 3, "recovery_steps": 4,
             "eval_every": 2, "learning_rate": 1e-3, "validation_windows": 2, **settings}  # fmt: skip
    return pipeline.run(tiny_recipe(model_dir, tmp_path / name, [stage]), evaluate=False)


def test_groups_shrink_over_their_period_and_stay_at_zero(model_dirs, tmp_path, monkeypatch):
    seen = []
    after_update = hesso._Pruner.after_update

    def checked(self, saved, factor):
        after_update(self, saved, factor)
        pruned = sum(int(m.sum()) for m in self.pruned)
        shrinking = [int(m.sum()) for m in self.shrinking]
        zero = [bool(zero_groups(self.model, f)[m].all()) for f, m in zip(self.families, self.pruned, strict=True)]
        norms = [float(torch.cat([torch.zeros(0), *(v.flatten() for v in values)]).norm()) for _, _, values in saved]
        seen.append({"pruned": pruned, "shrinking": sum(shrinking), "zero": all(zero), "factor": factor,
                     "saved": norms})  # fmt: skip

    commit = hesso._Pruner.commit

    def committed(self):
        for family, mask in zip(self.families, self.shrinking, strict=True):
            assert bool(zero_groups(self.model, family)[mask].all())  # exactly zero at the end of the period
        commit(self)

    monkeypatch.setattr(hesso._Pruner, "after_update", checked)
    monkeypatch.setattr(hesso._Pruner, "commit", committed)
    run(model_dirs["llama"], tmp_path)
    assert [s["shrinking"] for s in seen[:3]] == [0, 0, 32]  # warm-up, then half the target: 32 channels, 0 heads
    assert seen[0]["pruned"] == 0 and all(s["zero"] for s in seen)
    first = [s["saved"][0] for s in seen[2:5]]  # a shrinking group's values before each step of its period
    assert first[1] == pytest.approx(first[0] * 2 / 3, rel=1e-5) and first[2] == pytest.approx(first[0] / 3, rel=1e-5)
    assert [s["pruned"] for s in seen[-4:]] == [65] * 4


def test_asked_sparsity_per_layer_gives_a_stock_checkpoint(model_dirs, tmp_path):
    result = run(model_dirs["llama"], tmp_path, distribution="per_layer", head_groups="query")
    metrics = result.report.stages[0].metrics
    assert metrics["pruned"] == {"mlp_channels": "64/256", "attention_heads": "0/4"}  # 25% of 2 groups rounds to 0
    assert metrics["stock_config"] and metrics["parameters_after"] < metrics["parameters_before"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["intermediate_size"] == 96
    ids = torch.randint(3, 320, (1, 16))
    with torch.no_grad():
        assert torch.equal(compress.load(tmp_path / "out")(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_global_ranking_with_cric_and_next_token_loss(model_dirs, tmp_path):
    result = run(model_dirs["qwen2"], tmp_path, cric=True, loss="next_token", target_sparsity=0.5)
    metrics = result.report.stages[0].metrics
    assert metrics["pruned"] == {"mlp_channels": "128/256", "attention_heads": "2/4"}
    blocks = metrics["blocks"]
    assert sum(b["intermediate_size"] for b in blocks.values()) == 128
    ids = torch.randint(3, 320, (1, 16))
    with torch.no_grad():
        assert torch.equal(compress.load(tmp_path / "out")(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_encoders_distil_embeddings_and_refuse_next_token_losses(model_dirs, tmp_path):
    stage = {"stage": "hesso", "warmup_steps": 1, "pruning_periods": 1, "steps_per_period": 2, "recovery_steps": 2,
             "validation_windows": 2, "target_sparsity": 0.3, "learning_rate": 1e-3}  # fmt: skip
    result = pipeline.run(tiny_recipe(model_dirs["bert"], tmp_path / "bert", [stage]))
    assert result.report.stages[0].metrics["loss"] == "embedding"
    assert result.report.stages[0].metrics["pruned"] == {"mlp_channels": "77/256", "attention_heads": "2/8"}
    assert result.report.after["embedding_cosine"] > 0.9
    assert result.report.after["parameters"] < result.report.model["parameters"]
    with pytest.raises(CompressError, match="loss 'kl' needs a causal language model"):
        pipeline.run(tiny_recipe(model_dirs["bert"], tmp_path / "x", [{**stage, "loss": "kl"}]), evaluate=False)


def test_a_killed_training_resumes_to_the_same_checkpoint(model_dirs, tmp_path, monkeypatch):
    settings = {"checkpoint_every": 3, "cric": True}
    run(model_dirs["llama"], tmp_path, "reference", **settings)
    step, calls = hesso._step, []

    def killed_at_the_eighth_step(*args):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # as a kill after step 7; the last checkpoint is that of step 6
        return step(*args)

    monkeypatch.setattr(hesso, "_step", killed_at_the_eighth_step)
    with pytest.raises(KeyboardInterrupt):
        run(model_dirs["llama"], tmp_path, **settings)
    checkpoint = tmp_path / ".out.hesso"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 6 and not (tmp_path / "out").exists()
    calls.clear()
    monkeypatch.setattr(hesso, "_step", lambda *args: calls.append(1) or step(*args))
    run(model_dirs["llama"], tmp_path, **settings)
    assert len(calls) == 6  # steps 7 to 12 only
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "reference" / "model.safetensors"
    ).read_bytes()
    assert not checkpoint.exists()


def test_two_processes_match_one(model_dirs, tmp_path):
    """`accelerate launch --cpu --num_processes 2`: each process takes half of every batch, gradients are averaged,
    so the same groups are pruned and the validation losses match one process within float noise."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tests.conftest import TINY_DATA

    stage = {"stage": "hesso", "warmup_steps": 2, "pruning_periods": 2, "steps_per_period": 3, "recovery_steps": 4,
             "eval_every": 2, "learning_rate": 1e-3, "validation_windows": 2, "batch_size": 2}  # fmt: skip
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        recipe = tmp_path / f"r{processes}.yaml"
        raw = {"model": str(model_dirs["llama"]), "data": TINY_DATA, "stages": [stage], "export": {"out": str(out)}}
        recipe.write_text(yaml.safe_dump(raw))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        command = launch + ["-m", "compress", "run", str(recipe), "--no-eval"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = json.loads((out / "report.json").read_text())["stages"][0]["metrics"]
    one, two = runs[1], runs[2]
    assert one["blocks"] == two["blocks"] and one["pruned"] == two["pruned"]
    assert [v["step"] for v in one["validation"]] == [v["step"] for v in two["validation"]]
    for a, b in zip(one["validation"], two["validation"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
