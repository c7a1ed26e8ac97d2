"""`data.calibration.source: generated` (text sampled from the original model), mixtures of sources, and the
refusal of calibration windows that overlap the evaluation windows."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress import generate, pipeline
from compress.cli import main
from compress.data import proportional_counts
from compress.errors import CompressError
from compress.pipeline import Context
from compress.recipe import Generation
from compress.run_state import run_directory
from compress.validate import validate
from tests.conftest import tiny_recipe
from tests.test_resume import Crash, crash_at, same_files

NUPES = {"stage": "nupes", "mode": "data-driven", "bits": 3, "group_size": 32, "steps": 2}
GENERATED = {"source": "generated", "generation": {"batch_size": 3}}


def tiny_data(calibration) -> dict:
    return {"calibration": calibration, "evaluation": {"num_windows": 2, "seq_len": 32, "batch_size": 2}}


@pytest.fixture
def llama(model_dirs):
    path = model_dirs["llama"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_sampling_is_deterministic_for_a_seed_and_leaves_the_global_random_state(llama, one_thread):
    model, tokenizer = llama
    spec = Generation(batch_size=2)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate.sample(model, tokenizer, 5, 24, spec, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (5, 24) and first.dtype == torch.int64
    assert torch.equal(first, generate.sample(model, tokenizer, 5, 24, spec, seed=7))
    assert not torch.equal(first, generate.sample(model, tokenizer, 5, 24, spec, seed=8))
    special = set(tokenizer.all_special_ids)
    assert not any(int(token) in special for token in first[:, 0])  # random first tokens are ordinary ones
    assert len({tuple(row.tolist()) for row in first}) == 5  # sampled, not greedy: every sequence differs
    bos = generate.sample(model, tokenizer, 2, 8, Generation(first_token="bos"), seed=7)
    assert (bos[:, 0] == tokenizer.bos_token_id).all()


def test_sequences_are_the_models_own_likely_text(llama, one_thread):
    """Sampled text is far more likely under the model than uniform tokens (it follows the model's distribution),
    and a lower temperature makes it more likely still."""
    model, tokenizer = llama

    def nll(ids):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()

    sampled = generate.sample(model, tokenizer, 6, 48, Generation(top_p=1.0), seed=0)
    cold = generate.sample(model, tokenizer, 6, 48, Generation(temperature=0.3, top_p=1.0), seed=0)
    uniform = torch.randint(3, len(tokenizer), (6, 48), generator=torch.Generator().manual_seed(0))
    assert nll(cold) < nll(sampled) < nll(uniform)


def test_the_cache_is_keyed_by_weights_and_settings(llama, tmp_path, one_thread, monkeypatch):
    model, tokenizer = llama
    spec, cache = Generation(batch_size=4), tmp_path / "cache"
    windows, info = generate.generated_windows(model, tokenizer, 4, 16, spec, 0, cache)
    assert not info["cached"] and (cache / f"{info['key']}.safetensors").is_file()
    assert not list(cache.glob(".*partial*"))
    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("sampled again"))
    again, info_again = generate.generated_windows(model, tokenizer, 4, 16, spec, 0, cache)
    assert info_again["cached"] and torch.equal(again, windows)
    keys = {generate.cache_key(model, tokenizer, 4, 16, Generation(batch_size=4, temperature=0.5), 0),
            generate.cache_key(model, tokenizer, 4, 16, spec, 1), generate.cache_key(model, tokenizer, 5, 16, spec, 0)}
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    keys.add(generate.cache_key(model, tokenizer, 4, 16, spec, 0))
    assert info["key"] not in keys and len(keys) == 4  # any change of weights or settings: another entry


def test_a_run_samples_once_and_later_runs_and_resume_reuse_it(model_dirs, tmp_path, monkeypatch, one_thread):
    calibration = {**GENERATED, "num_samples": 6, "seq_len": 32}
    recipe = tiny_recipe(model_dirs["llama"], tmp_path / "first", [NUPES], data=tiny_data(calibration))
    result = pipeline.run(recipe)
    entry = json.loads((tmp_path / "first" / "report.json").read_text())["calibration"]
    assert [(e["source"], e["windows"], e["cached"]) for e in entry] == [("generated", 6, False)]
    assert "6 sampled from the original model" in (tmp_path / "first" / "report.md").read_text()
    cached = list(generate.cache_directory(tmp_path / "first").glob("*.safetensors"))
    assert len(cached) == 1 and result.report.before["perplexity"] > 1

    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("sampled again"))
    second = tmp_path / "second"
    recipe = tiny_recipe(model_dirs["llama"], second, [NUPES], data=tiny_data(calibration))
    with monkeypatch.context() as patch:
        crash_at(patch, "nupes", 1)
        with pytest.raises(Crash):
            pipeline.run(recipe, evaluate=False)
    assert (run_directory(second) / "state.json").is_file()
    resumed = pipeline.run(recipe, evaluate=False, resume=True)
    assert resumed.report.calibration[0]["cached"]
    same_files(second, tmp_path / "first")  # the same windows: the same checkpoint


def test_generated_windows_feed_the_stages(model_dirs, tmp_path, one_thread):
    """The windows a stage sees are the sampled ones (a run on generated text differs from one on the text)."""
    data = tiny_data({**GENERATED, "num_samples": 4, "seq_len": 32})
    recipe = tiny_recipe(model_dirs["llama"], tmp_path / "out", [NUPES], data=data)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    context = Context(recipe=recipe, tokenizer=tokenizer, kind="causal")
    with pytest.raises(CompressError, match="before the first stage"):
        _ = context.calibration_windows
    context = Context(recipe=recipe, tokenizer=tokenizer, kind="causal")
    context.sample_calibration(model, tmp_path / "cache")
    expected = generate.sample(model, tokenizer, 4, 32, Generation(batch_size=3), seed=recipe.seed)
    assert torch.equal(context.calibration_windows, expected)


def test_proportional_counts():
    assert proportional_counts(128, [1.0]) == [128]
    assert proportional_counts(10, [3, 1]) == [8, 2]  # 7.5 and 2.5: the tie goes to the first
    assert proportional_counts(7, [1, 1, 1]) == [3, 2, 2]
    assert proportional_counts(100, [0.5, 0.25, 0.25]) == [50, 25, 25]
    assert sum(proportional_counts(13, [0.1, 2.7, 0.33])) == 13


def test_a_mixtures_windows_come_from_each_source_in_proportion(model_dirs, tmp_path, one_thread):
    """Two files whose tokens do not overlap: every window is wholly one file's, in the weights' proportion, the
    generated share is the sampled sequences, and the order mixes the sources."""
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    (tmp_path / "a.txt").write_text("aaaa " * 4000)
    (tmp_path / "b.txt").write_text("zzzz " * 4000)
    sources = [{"source": str(tmp_path / "a.txt"), "weight": 2}, {"source": str(tmp_path / "b.txt"), "weight": 1},
               {**GENERATED, "weight": 1}]  # fmt: skip
    recipe = tiny_recipe(model_dirs["llama"], tmp_path / "out", [NUPES],
                         data=tiny_data({"num_samples": 12, "seq_len": 16, "sources": sources}))  # fmt: skip
    context = Context(recipe=recipe, tokenizer=tokenizer, kind="causal")
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    context.sample_calibration(model, None)
    windows = context.calibration_windows
    a, b = (set(tokenizer(t)["input_ids"]) for t in ("aaaa aaaa", "zzzz zzzz"))
    kinds = ["a" if set(w.tolist()) <= a else "b" if set(w.tolist()) <= b else "g" for w in windows]
    assert windows.shape == (12, 16) and sorted(kinds).count("a") == 6 and kinds.count("b") == 3
    assert kinds.count("g") == 3 and kinds != sorted(kinds, key="abg".index)
    generated = {tuple(w.tolist()) for w in context.generated[2]}
    assert {tuple(w.tolist()) for w, k in zip(windows, kinds, strict=True) if k == "g"} == generated
    summary = context.calibration_summary()
    assert [(s["source"], s["windows"]) for s in summary] == [(str(tmp_path / "a.txt"), 6),
                                                              (str(tmp_path / "b.txt"), 3), ("generated", 3)]


def test_the_list_form_of_a_mixture(model_dirs, tmp_path):
    raw = tmp_path / "r.yaml"
    raw.write_text(f"model: {model_dirs['llama']}\nstages: [{{stage: nupes, mode: data-driven}}]\ndata:\n"
                   "  calibration:\n    - {source: generated, weight: 3}\n    - {source: embedded, wieght: 1}\n")
    with pytest.raises(CompressError, match=r"r.yaml, line 6: data.calibration.sources\[1\].wieght"):
        from compress.recipe import load_recipe

        load_recipe(raw)


@pytest.mark.parametrize(
    "calibration, evaluation, refused",
    [
        ({}, {}, False),  # embedded: first half against second
        ({"half": "second"}, {}, True),
        ({"half": "all"}, {}, True),
        ({}, {"half": "all"}, True),
        ({}, {"half": "first"}, True),
        ({"half": "all"}, {"source": "OTHER"}, False),
        ({"sources": [GENERATED, {"source": "embedded", "half": "second"}]}, {}, True),
        ({"sources": [GENERATED, {"source": "embedded"}]}, {"half": "all"}, True),
        ({"sources": [GENERATED, {"source": "embedded"}]}, {}, False),
    ],
)
def test_calibration_that_overlaps_the_evaluation_is_refused(calibration, evaluation, refused, model_dirs,
                                                             tmp_path, capsys):  # fmt: skip
    other = tmp_path / "other.txt"
    other.write_text("x")
    evaluation = {k: str(other) if v == "OTHER" else v for k, v in evaluation.items()}
    data = {"calibration": calibration, "evaluation": evaluation}
    recipe = tiny_recipe(model_dirs["llama"], tmp_path / "out", [NUPES], data=data)
    if not refused:
        validate(recipe)
        return
    with pytest.raises(CompressError, match="would overlap the evaluation windows.*other half or on other text"):
        validate(recipe)
    rtn = tiny_recipe(model_dirs["llama"], tmp_path / "out", [{"stage": "rtn"}], data=data)
    validate(rtn)  # nothing calibrates: nothing overlaps


def test_validate_and_run_refuse_overlap_from_the_command_line(model_dirs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model_dirs['llama']}\nstages: [{{stage: nupes, mode: data-driven}}]\n"
                      f"data: {{calibration: {{half: all}}}}\nexport: {{out: {tmp_path / 'out'}}}\n")  # fmt: skip
    for command in ("validate", "run"):
        assert main([command, str(recipe)]) == 2
        error = capsys.readouterr().err
        assert "r.yaml, line 3: data.calibration.half" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_generated_text_needs_a_model_that_generates_and_cannot_stream(model_dirs, tmp_path):
    data = tiny_data({**GENERATED, "num_samples": 4, "seq_len": 32})
    hesso = {"stage": "hesso", "target_sparsity": 0.25}
    with pytest.raises(CompressError, match="data.calibration.source: generated text is sampled from the model, "
                                            "and BertModel does not generate"):  # fmt: skip
        validate(tiny_recipe(model_dirs["bert"], tmp_path / "out", [hesso], data=data))
    with pytest.raises(CompressError, match="(?s)cannot stream.*generated calibration text is sampled from the whole"):
        pipeline.run(tiny_recipe(model_dirs["llama"], tmp_path / "out", [NUPES], data=data), stream=True)


def test_a_fine_tuning_recipe_samples_from_its_teacher(model_dirs, tmp_path, monkeypatch, one_thread):
    """pv_tuning of a compressed checkpoint distils from `teacher`: generated text comes from the teacher, the
    original model, not from the compressed checkpoint it starts from."""
    start = tmp_path / "rtn"
    pipeline.run(tiny_recipe(model_dirs["llama"], start, [{"stage": "rtn", "group_size": 32}]), evaluate=False)
    sampled_from = []
    real = generate.sample

    def recording(model, *args, **kwargs):
        sampled_from.append(generate.weights_digest(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generate, "sample", recording)
    pv = {"stage": "pv_tuning", "steps": 1, "validation_windows": 2, "teacher": str(model_dirs["llama"])}
    data = tiny_data({**GENERATED, "num_samples": 4, "seq_len": 32})
    pipeline.run(tiny_recipe(start, tmp_path / "pv", [pv], data=data), evaluate=False)
    original = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    assert sampled_from == [generate.weights_digest(original)]
