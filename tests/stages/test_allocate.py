"""`allocate`: per-layer candidates chosen by Fisher-weighted sensitivity to fit a size or bits budget."""

import itertools
import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compress import pipeline
from compress.cli import main
from compress.errors import CompressError
from compress.recipe import parse_recipe
from compress.run_state import run_directory
from compress.solvers.allocation import choose
from compress.stages import allocate
from compress.validate import validate
from tests.conftest import TINY_DATA, model_output, tiny_recipe
from tests.test_resume import Crash, crash_at, same_files

CANDIDATES = [{"stage": "rtn", "bits": 2, "group_size": 32}, {"stage": "rtn", "bits": 4, "group_size": 32},
              {"stage": "rtn", "bits": 8, "group_size": 32}]  # fmt: skip
ALLOCATE = {"stage": "allocate", "candidates": CANDIDATES, "sensitivity_windows": 4}


def test_the_knapsack_is_exact():
    """Against every combination, on small random problems: the least cost that fits, never over the budget."""
    rng = random.Random(0)
    for _ in range(40):
        layers, options = rng.randint(1, 5), rng.randint(1, 4)
        costs = [[rng.random() for _ in range(options)] for _ in range(layers)]
        sizes = [[rng.randint(1, 50) for _ in range(options)] for _ in range(layers)]
        budget = rng.randint(sum(min(r) for r in sizes), sum(max(r) for r in sizes))
        choice, unit = choose(costs, sizes, budget)
        assert unit == 1 and sum(sizes[i][j] for i, j in enumerate(choice)) <= budget
        best = min(sum(costs[i][j] for i, j in enumerate(combo)) for combo in
                   itertools.product(range(options), repeat=layers)
                   if sum(sizes[i][j] for i, j in enumerate(combo)) <= budget)  # fmt: skip
        assert sum(costs[i][j] for i, j in enumerate(choice)) == pytest.approx(best)
    with pytest.raises(ValueError, match="smallest"):
        choose([[1.0]], [[10]], 9)
    # a large budget: sizes rounded up to a unit of the table, which costs at most a unit per layer of the budget
    choice, unit = choose([[1.0, 0.0]] * 3, [[10**6, 3 * 10**6]] * 3, 5 * 10**6 + 3 * 40)
    assert unit == 39 and sorted(choice) == [0, 0, 1]
    choice, _ = choose([[1.0, 0.0]] * 3, [[10**6, 3 * 10**6]] * 3, 5 * 10**6)
    assert sorted(choice) == [0, 0, 0]  # within 3 units of fitting: the rounded problem does not fit it


def _sizes(model_dir, tmp_path, stage=ALLOCATE, **budget):
    recipe = tiny_recipe(model_dir, tmp_path / "probe", [stage], budget=budget)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = recipe.stages[0].config
    layers = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.startswith("model.layers.")
              and isinstance(m, torch.nn.Linear)}  # fmt: skip
    return allocate.budget_sizes(model, config, recipe.budget, layers)


def test_a_size_budget_is_met_on_disk_and_used(model_dirs, tmp_path, one_thread):
    sizes = _sizes(model_dirs["llama"], tmp_path, size=10**9)
    smallest = sizes.fixed + sum(min(c) for c in sizes.per_layer.values())
    largest = sizes.fixed + sum(max(c) for c in sizes.per_layer.values())
    budget = (smallest + largest) // 2
    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [ALLOCATE], budget={"size": budget}))
    on_disk = (out / "model.safetensors").stat().st_size
    assert on_disk <= budget and result.report.size["checkpoint_bytes"] == on_disk
    assert on_disk > smallest + (largest - smallest) // 4  # the budget is spent, not left unused
    choices = {layer["allocation"]["candidate"] for layer in result.report.layers.values()}
    assert len(choices) >= 2  # mixed
    report = (out / "report.md").read_text()
    assert "## Allocation" in report and "Predicted KL" in report and (out / "allocation.svg").is_file()
    summary = result.report.stages[0].metrics["summary"]
    assert summary["chosen_bytes"] <= budget and summary["predicted_kl"] > 0
    # the smallest candidate for every layer: exactly the planned size's floor
    out_small = tmp_path / "small"
    pipeline.run(tiny_recipe(model_dirs["llama"], out_small, [ALLOCATE], budget={"size": smallest}), evaluate=False)
    assert (out_small / "model.safetensors").stat().st_size <= smallest


def test_a_bits_budget(model_dirs, tmp_path, one_thread):
    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [ALLOCATE], budget={"bits_per_weight": 4.5}),
                          evaluate=False)  # fmt: skip
    bits = result.report.after["bits_per_weight"]
    assert 3.5 < bits <= 4.5  # between the 4-bit and 8-bit candidates' bits (each with its scales), within budget


def test_a_sensitive_layer_gets_more_bits(model_dirs, tmp_path, monkeypatch, one_thread):
    """A layer made artificially sensitive (its measured Fisher information times 1000) takes more bits than the
    same layer under the same budget without it, and other layers give up bits to pay for it. (That the Fisher
    estimate itself ranks layers as the measured KL does is the next test.)"""
    layer = "model.layers.1.mlp.down_proj"
    measured = allocate.fisher_diagonals

    def sensitive(model, linears, windows):
        found = measured(model, linears, windows)
        found[layer] = found[layer] * 1000
        return found

    bits = {}
    for kind in ("plain", "sensitive"):
        if kind == "sensitive":
            monkeypatch.setattr(allocate, "fisher_diagonals", sensitive)
        result = pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / kind, [ALLOCATE],
                                          budget={"bits_per_weight": 3.5}), evaluate=False)  # fmt: skip
        bits[kind] = {name: entry["bits_per_weight"] for name, entry in result.report.layers.items()}
        predicted = result.report.layers[layer]["allocation"]["predicted_kl_per_candidate"]
        assert list(predicted.values()) == sorted(predicted.values(), reverse=True)  # more bits, less loss
    assert bits["sensitive"][layer] > bits["plain"][layer], bits
    assert any(bits["sensitive"][n] < bits["plain"][n] for n in bits["plain"] if n != layer)


def test_the_estimate_ranks_layers_as_the_measured_kl_does(model_dirs, one_thread):
    """The Fisher estimate of each layer's loss increase at 2 bits, against the KL measured with that layer alone
    quantized: a rank correlation well above chance, and the same order of magnitude in total."""
    from compress.stages.rtn import RtnConfig

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(3, 320, (8, 64), generator=generator)
    with torch.no_grad():
        reference = torch.log_softmax(model_output(model, windows), -1)
    linears = {n: m for n, m in model.named_modules()
               if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}  # fmt: skip
    fisher = allocate.fisher_diagonals(model, linears, windows)
    config = RtnConfig(bits=2, group_size=32)
    predicted, measured = [], []
    for name, linear in linears.items():
        quantized = allocate.proxy_quantization("rtn", config, name, linear).dequantize().detach()
        delta = linear.weight.detach() - quantized
        predicted.append(0.5 * float((fisher[name] * delta.square()).sum()))
        original = linear.weight.detach().clone()
        with torch.no_grad():
            linear.weight.copy_(quantized)
            logp = torch.log_softmax(model_output(model, windows), -1)
            linear.weight.copy_(original)
        measured.append(float((reference.exp() * (reference - logp)).sum(-1).mean()))

    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0] * len(values)
        for rank, index in enumerate(order):
            result[index] = rank
        return torch.tensor(result, dtype=torch.float)

    correlation = torch.corrcoef(torch.stack([ranks(predicted), ranks(measured)]))[0, 1]
    assert correlation > 0.6, (correlation, predicted, measured)
    assert 0.1 < sum(predicted) / sum(measured) < 10


def test_validate_refuses_an_unreachable_budget_with_the_range(model_dirs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(model_dirs["llama"]), "data": TINY_DATA, "stages": [ALLOCATE],
                                      "export": {"out": str(tmp_path / "out")}}))  # fmt: skip
    assert main(["validate", str(recipe)]) == 2
    assert "allocate fits a budget, and the recipe has none" in capsys.readouterr().err
    assert main(["validate", str(recipe), "--target-size", "20K"]) == 2
    error = capsys.readouterr().err
    assert "size 20K" in error and "reachable" in error and "MiB" in error and "Traceback" not in error
    assert main(["validate", str(recipe), "--target-bits", "1.5"]) == 2
    assert "reachable 2.562 to 8.750 bits per weight" in capsys.readouterr().err  # scales and zeros counted
    assert main(["validate", str(recipe), "--target-bits", "3"]) == 0
    assert main(["run", str(recipe), "--target-size", "20K"]) == 2  # refused before any work
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"budget": {"size": "60MB"}, "stages": [{"stage": "rtn"}]}, "is met by an allocate stage"),
        ({"budget": {"size": "60MB"}, "stages": [{"stage": "rtn", "ignore": ["mlp"]}, ALLOCATE]},
         "it must be the first stage"),
        ({"budget": {"size": "lots"}, "stages": [ALLOCATE]}, "is not a size"),
        ({"budget": {"size": "1MB", "bits_per_weight": 3}, "stages": [ALLOCATE]}, "give one of size"),
        ({"budget": {"bits_per_weight": 3}, "stages": [{"stage": "allocate", "candidates": [{"stage": "jlcm"}]}]},
         "codebook formats are not yet candidates"),
        ({"budget": {"bits_per_weight": 3},
          "stages": [{"stage": "allocate", "candidates": [{"stage": "rtn", "bitz": 3}]}]}, "bitz"),
    ],
)  # fmt: skip
def test_budget_mistakes_are_named(raw, message, model_dirs, tmp_path):
    raw = {"model": str(model_dirs["llama"]), "data": TINY_DATA, **raw}
    with pytest.raises(CompressError, match=message):
        validate(parse_recipe(yaml.safe_dump(raw), "b.yaml"))


def test_a_stopped_allocation_resumes_to_the_same_files(model_dirs, tmp_path, monkeypatch, one_thread):
    budget = {"bits_per_weight": 4.5}
    reference = tmp_path / "reference"
    pipeline.run(tiny_recipe(model_dirs["llama"], reference, [ALLOCATE], budget=budget), evaluate=False)
    out = tmp_path / "out"
    recipe = tiny_recipe(model_dirs["llama"], out, [ALLOCATE], budget=budget)
    with monkeypatch.context() as patch:
        crash_at(patch, "allocate", 1)
        with pytest.raises(Crash):
            pipeline.run(recipe, evaluate=False)
    assert (run_directory(out) / "state.json").is_file()
    pipeline.run(recipe, evaluate=False, resume=True)
    same_files(out, reference)
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert all("allocation" in layer for layer in layers.values())


def test_inspect_shows_the_choices(model_dirs, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [ALLOCATE], budget={"bits_per_weight": 4.5}),
                          evaluate=False)  # fmt: skip
    assert main(["inspect", str(out)]) == 0
    shown = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("model.")}
    chosen = {name: layer["settings"]["bits"] for name, layer in result.report.layers.items()}
    assert len(set(chosen.values())) >= 2
    assert all(f"bits={bits}," in shown[name] for name, bits in chosen.items())


def test_the_measurement_before_the_first_stage_counts_in_its_time(model_dirs, tmp_path, monkeypatch, one_thread):
    import time

    measured = allocate.fisher_diagonals

    def slow(*args):
        time.sleep(1.5)
        return measured(*args)

    monkeypatch.setattr(allocate, "fisher_diagonals", slow)
    result = pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / "out", [ALLOCATE],
                                      budget={"bits_per_weight": 4.5}), evaluate=False)  # fmt: skip
    assert result.report.stages[0].seconds > 1.5


HEAD_OPTIONS = [{"bits": 8, "group_size": 32}, {"bits": 4, "group_size": 32}]
ALLOCATE_HEAD = {**ALLOCATE, "head": HEAD_OPTIONS}


def _head_budget(model_dir, tmp_path) -> tuple[int, allocate.Sizes]:
    """A size the layers alone cannot meet with the head in float16 (every layer at its smallest candidate, and a
    quarter of the float16 head's bytes less), so the head must give up bits."""
    sizes = _sizes(model_dir, tmp_path, size=10**9, stage=ALLOCATE_HEAD)
    smallest_layers = sum(min(c) for c in sizes.per_layer.values())
    return sizes.fixed + smallest_layers + sizes.head[0] - sizes.head[0] // 4, sizes


def test_head_options_compress_the_head_to_meet_a_size_budget(model_dirs, tmp_path, one_thread):
    """The output head is an item of the knapsack: under a size the float16 head does not fit, it is chosen at a
    head option, the checkpoint meets the budget on disk, loads (the tied embedding reading the head's codes) and
    computes what the run's model computes; the report names the head's choice."""
    import compress

    budget, sizes = _head_budget(model_dirs["llama"], tmp_path)
    assert sizes.head[0] > sizes.head[1] > sizes.head[2]  # float16, 8-bit, 4-bit
    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [ALLOCATE_HEAD], budget={"size": budget}),
                          evaluate=False)  # fmt: skip
    assert (out / "model.safetensors").stat().st_size <= budget
    head = result.report.layers["lm_head"]
    assert head["allocation"]["candidate"].startswith("head uniform w")
    assert set(head["allocation"]["predicted_kl_per_candidate"]) == {"head float16", "head uniform w8 g32",
                                                                     "head uniform w4 g32"}  # fmt: skip
    assert result.report.stages[0].metrics["summary"]["head"] == head["allocation"]["candidate"]
    assert "Output head: head uniform w" in (out / "report.md").read_text()
    loaded = compress.load(out)
    assert type(loaded.get_input_embeddings()).__name__ == "QuantizedEmbedding"
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=1e-3, atol=1e-3)


def test_a_sensitive_head_stays_float16(model_dirs, tmp_path, monkeypatch, one_thread):
    """The same budget with the head's measured Fisher information times 10^6: the head keeps float16 and the
    layers give up the bits instead (with a budget the layers can meet alone)."""
    sizes = _sizes(model_dirs["llama"], tmp_path, size=10**9, stage=ALLOCATE_HEAD)
    smallest = sizes.fixed + sum(min(c) for c in sizes.per_layer.values()) + sizes.head[0]
    budget = smallest + sum(max(c) - min(c) for c in sizes.per_layer.values()) // 3
    measured = allocate.fisher_diagonals
    chosen = {}
    for kind in ("plain", "sensitive"):
        if kind == "sensitive":
            def sensitive(model, linears, windows):
                found = measured(model, linears, windows)
                found["lm_head"] = found["lm_head"] * 1e6
                return found

            monkeypatch.setattr(allocate, "fisher_diagonals", sensitive)
        result = pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / kind, [ALLOCATE_HEAD],
                                          budget={"size": budget}), evaluate=False)  # fmt: skip
        chosen[kind] = result.report.stages[0].metrics["summary"]["head"]
        assert (tmp_path / kind / "model.safetensors").stat().st_size <= budget
    assert chosen["plain"] != "head float16"  # the tiny head is cheap to quantize: the plain choice takes its bits
    assert chosen["sensitive"] == "head float16"


def test_head_options_are_refused_where_they_cannot_apply(model_dirs, tmp_path):
    bits = tiny_recipe(model_dirs["llama"], tmp_path / "a", [ALLOCATE_HEAD], budget={"bits_per_weight": 3.0})
    with pytest.raises(CompressError, match="head options count against a size budget"):
        validate(bits)
    wide = {**ALLOCATE, "head": [{"bits": 8, "group_size": 48}]}
    with pytest.raises(CompressError, match="group_size 48 does not divide the head's 64 input features"):
        validate(tiny_recipe(model_dirs["llama"], tmp_path / "b", [wide], budget={"size": 10**7}))
    with pytest.raises(CompressError, match=r"head\[0\]: bits: Input should be greater than or equal to 4 \(got 2\)"):
        tiny_recipe(model_dirs["llama"], tmp_path / "c", [{**ALLOCATE, "head": [{"bits": 2}]}], budget={"size": 10**7})
    streamed = tiny_recipe(model_dirs["llama"], tmp_path / "d", [ALLOCATE_HEAD], budget={"size": 10**7})
    assert any("outside the blocks" in problem for problem in pipeline.streaming_problems(streamed))


@pytest.mark.parametrize("crash", ["allocate", "pv_tuning"])
def test_an_allocation_with_the_head_resumes_to_the_same_files(crash, model_dirs, tmp_path, monkeypatch, one_thread):
    """Killed inside allocate (its blocks resume, the head is compressed after them) or in the stage after it
    (the head comes back from the stage's whole-model checkpoint): the same files as an uninterrupted run."""
    budget, _ = _head_budget(model_dirs["llama"], tmp_path)
    stages = [ALLOCATE_HEAD, {"stage": "pv_tuning", "steps": 2, "validation_windows": 2}]
    reference = tmp_path / "reference"
    pipeline.run(tiny_recipe(model_dirs["llama"], reference, stages, budget={"size": budget}), evaluate=False)
    out = tmp_path / "out"
    recipe = tiny_recipe(model_dirs["llama"], out, stages, budget={"size": budget})
    with monkeypatch.context() as patch:
        crash_at(patch, crash, 1 if crash == "allocate" else None)
        with pytest.raises(Crash):
            pipeline.run(recipe, evaluate=False)
    pipeline.run(recipe, evaluate=False, resume=True)
    same_files(out, reference)
