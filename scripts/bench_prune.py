"""Structured pruning benchmark: HESSO against magnitude pruning at the same sparsity and the same recovery-training
budget, on the embedded models, with the same data, loss, learning rate and evaluation.

    python scripts/bench_prune.py                          # 30 minutes of training per method and model
    python scripts/bench_prune.py --minutes 10 --minilm-minutes 4 --jobs 2
    python scripts/bench_prune.py --only minilm --reuse
    python scripts/bench_prune.py --only minilm --minilm-minutes 4 --oneshot   # adds the one-shot ablation

Every method runs the `hesso` stage (recipes/hesso-smollm2-25.yaml, recipes/hesso-minilm-30.yaml) for the same number
of steps. HESSO: the recipe's schedule scaled to that number of steps (warm-up, pruning periods that shrink the
lowest-saliency groups to zero while the rest trains, recovery; each keeps its share of the recipe's steps).
Magnitude: the groups of smallest L2 norm are zeroed at step 1 (one period of one step, saliency = magnitude only),
and every remaining step is recovery; ranked as the recipe ranks (`distribution`; row "magnitude") and the other way
(row "magnitude-global" or "magnitude-per_layer"), since either may be the stronger baseline. With `--oneshot`,
another row ablates HESSO's schedule: the recipe's own saliency criteria, with every group zeroed at step 1 as
magnitude does. The step count comes from the time budget: a timing probe measures one training step of the model on
this machine first (`--reuse` keeps the previous probe). Training and measurement use `--threads` CPU threads
(default 1; OMP_NUM_THREADS is set for the runs). `--jobs 2` trains all methods of a model at once.

smollm2-135m: parameters, weight file size, forward tokens/s on one batch of 4 x 512 tokens, perplexity on the
held-out half of the embedded text and on encyclopedic text of another kind (as scripts/bench.py), KL to the
original. minilm-l6: mean cosine similarity of sentence embeddings to the original's on held-out sentences (second
half of the embedded text, and the other text), parameters, size, tokens/s.

Writes bench/prune/results.json and bench/prune/results.md, and rewrites the section of docs/pruning.md between the
`prune-bench:start` / `prune-bench:end` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "prune"
MODELS = {
    "smollm2": {"alias": "smollm2-135m", "recipe": "recipes/hesso-smollm2-25.yaml", "sparsity": 0.25},
    "minilm": {"alias": "minilm-l6", "recipe": "recipes/hesso-minilm-30.yaml", "sparsity": 0.30},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(MODELS), help="one model only")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per method, smollm2-135m")
    parser.add_argument("--minilm-minutes", type=float, default=30.0, help="training budget per method, minilm-l6")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for training and measurement")
    parser.add_argument("--jobs", type=int, default=1, choices=[1, 2], help="2: train all methods of a model at once")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens per text")
    parser.add_argument("--sentences", type=int, default=512, help="held-out sentences per text (minilm)")
    parser.add_argument("--oneshot", action="store_true", help="also the recipe's criteria with everything pruned at "
                        "step 1 (separates HESSO's criteria from its schedule)")  # fmt: skip
    parser.add_argument("--methods", help="comma-separated subset of hesso, magnitude, magnitude-global, "
                        "magnitude-per_layer, oneshot (default: all but oneshot)")  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="keep checkpoints made earlier with the same settings")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the section of docs/pruning.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"threads": args.threads, "jobs": args.jobs, "cpus": os.cpu_count(), "models": {}}
    previous = OUT / "results.json"
    if previous.is_file():
        results["models"] = json.loads(previous.read_text()).get("models", {})
    for key in [args.only] if args.only else list(MODELS):
        minutes = args.minutes if key == "smollm2" else args.minilm_minutes
        results["models"][key] = bench_model(key, minutes, args, results["models"].get(key, {}))
        previous.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (OUT / "results.md").write_text(table)
    if not args.no_readme:
        update_readme(table)
    print(table)


def bench_model(key: str, minutes: float, args, previous: dict) -> dict:
    spec = MODELS[key]
    from compress.recipe import load_recipe

    recipe = load_recipe(ROOT / spec["recipe"])
    stage = recipe.stages[0].config
    if args.reuse and "seconds_per_step_probe" in previous:  # the same step count, so the runs can be reused
        seconds = previous["seconds_per_step_probe"]
    else:
        seconds = seconds_per_step(spec["alias"], recipe, stage)
    steps = max(8, int(minutes * 60 / seconds))
    scale = steps / stage.schedule().total_steps
    warmup, period = round(stage.warmup_steps * scale), max(1, round(stage.steps_per_period * scale))
    periods = stage.pruning_periods
    at_once = {"warmup_steps": 0, "pruning_periods": 1, "steps_per_period": 1, "recovery_steps": steps - 1,
               "eval_every": max(1, steps // 12)}  # fmt: skip
    settings = {
        "hesso": {"warmup_steps": warmup, "pruning_periods": periods, "steps_per_period": period,
                  "recovery_steps": steps - warmup - periods * period, "eval_every": max(1, steps // 12)},
        "magnitude": {**at_once, "criteria.magnitude": 1.0, "criteria.average_magnitude": 0.0, "criteria.cosine": 0.0,
                      "criteria.taylor": 0.0, "criteria.output": 0.0},
    }  # fmt: skip
    other = "global" if stage.distribution == "per_layer" else "per_layer"
    settings[f"magnitude-{other}"] = {**settings["magnitude"], "distribution": other}
    if args.oneshot:
        settings["oneshot"] = at_once
    if args.methods:
        chosen = args.methods.split(",")
        unknown = sorted(set(chosen) - set(settings))
        if unknown:
            sys.exit(f"--methods: unknown {', '.join(unknown)} for {key} (known: {', '.join(settings)})")
        settings = {method: settings[method] for method in chosen}
    print(f"{key}: {seconds:.2f} s per step -> {steps} steps per method ({minutes} min)", flush=True)
    runs = {method: OUT / "runs" / f"{key}-{method}" for method in settings}
    started = {}
    for method, overrides in settings.items():
        command = [sys.executable, "-m", "compress", "run", str(ROOT / spec["recipe"]), "--no-eval", "--force",
                   "--out", str(runs[method])]  # fmt: skip
        for name, value in overrides.items():
            command += ["--set", f"stages.0.{name}={value}"]
        record = [*command[1:], (ROOT / spec["recipe"]).read_text()]  # a run is reused only for the same recipe
        if args.reuse and reused(runs[method], record):
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
        started[method] = (subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True), record)
        if args.jobs == 1:
            wait(method, *started.pop(method), runs[method])
    for method, (process, record) in started.items():
        wait(method, process, record, runs[method])
    measured = evaluate(key, spec, runs, args)
    command = " ".join(["python scripts/bench_prune.py", *sys.argv[1:]])
    return {"seconds_per_step_probe": seconds, "steps": steps, "minutes": minutes, "settings": settings,
            "command": command, "threads": args.threads, "jobs": args.jobs, **measured}  # fmt: skip


def seconds_per_step(alias: str, recipe, stage) -> float:
    """One training step of the model (forward, backward, Adam) on a batch of the recipe's shape, after one warm-up
    step: what the time budget is divided by."""
    from compress.models import load_model

    model = load_model(alias).model.train()
    ids = torch.randint(0, 1000, (stage.batch_size, recipe.data.calibration.seq_len))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-9)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        output = model(input_ids=ids)
        output = output.logits if hasattr(output, "logits") else output.last_hidden_state
        output.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times[-1]


def reused(out: Path, record: list[str]) -> bool:
    path = out / "command.json"
    return path.is_file() and json.loads(path.read_text()) == record and (out / "report.json").is_file()


def wait(method: str, process: subprocess.Popen, record: list[str], out: Path) -> None:
    _, stderr = process.communicate()
    if process.returncode != 0:
        sys.exit(f"{method} failed:\n{stderr[-3000:]}")
    (out / "command.json").write_text(json.dumps(record))
    print(f"trained {out.name}", flush=True)


def evaluate(key: str, spec: dict, runs: dict[str, Path], args) -> dict:
    import compress
    from compress.models import count_parameters, load_model

    loaded = load_model(spec["alias"])
    original, tokenizer = loaded.model, loaded.tokenizer
    models = {"original": original, **{m: compress.load(path) for m, path in runs.items()}}
    rows = {}
    texts = held_out_texts()
    if key == "smollm2":
        measure = language_model_measures(models, tokenizer, texts, args.windows)
    else:
        measure = encoder_measures(models, tokenizer, texts, args.sentences)
    for name, model in models.items():
        row = {"parameters": count_parameters(model), **measure[name]}
        row["weight_bytes"] = (
            (runs[name] / "model.safetensors").stat().st_size if name in runs else 2 * row["parameters"]
        )
        if name in runs:
            report = json.loads((runs[name] / "report.json").read_text())
            row["train_seconds"] = report["stages"][0]["seconds"]
            row["pruned"] = report["stages"][0]["metrics"]["pruned"]
            row["best_step"] = report["stages"][0]["metrics"]["best_step"]
        rows[name] = row
        print(f"{key} {name}: {row}", flush=True)
    return {"rows": rows, "texts": texts["descriptions"]}


def held_out_texts() -> dict:
    """The second half of the embedded text (the calibration windows come from the first half) and the other text
    scripts/bench.py uses (CIA World Factbook backgrounds), when its package is installed."""
    from compress.data import embedded_text

    text = embedded_text()
    found = {"in_domain": text[len(text) // 2 :]}
    descriptions = {"in_domain": "second half of Python's pydoc_data topics (the calibration text's kind)"}
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import out_of_domain_text

    other, description = out_of_domain_text()
    if other is not None:
        found["out_of_domain"] = other
    descriptions["out_of_domain"] = description
    return {**found, "descriptions": descriptions}


def language_model_measures(models: dict, tokenizer, texts: dict, count: int) -> dict:
    from compress import data
    from compress.eval import ReferenceCache, language_model_quality, tokens_per_second

    windows = {name: data.consecutive_windows(data.tokenize(tokenizer, texts[name]), count, 512)
               for name in ("in_domain", "out_of_domain") if name in texts}  # fmt: skip
    vocab = models["original"].get_output_embeddings().weight.shape[0]
    reference = ReferenceCache(len(windows["in_domain"]), 511, vocab)
    measured = {}
    for name, model in models.items():
        quality = language_model_quality(model, windows["in_domain"], 4, reference, record=name == "original")
        row = {"perplexity": quality.perplexity, "kl_to_original": quality.kl_to_original or 0.0}
        if "out_of_domain" in windows:
            row["perplexity_other_text"] = language_model_quality(model, windows["out_of_domain"], 4).perplexity
        row["tokens_per_second"] = tokens_per_second(model, windows["in_domain"], 4, repeats=5)
        measured[name] = row
    reference.close()
    return measured


def sentences_of(text: str, count: int) -> list[str]:
    """Up to `count` sentences of 6 to 60 words, evenly spread over the text."""
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)]
    found = [" ".join(s.split()) for s in found if 6 <= len(s.split()) <= 60]
    stride = max(1, len(found) // count)
    return found[::stride][:count]


def encoder_measures(models: dict, tokenizer, texts: dict, count: int) -> dict:
    from compress import data
    from compress.eval import masked_sentence_embeddings, tokens_per_second

    sentences = {name: sentences_of(texts[name], count) for name in ("in_domain", "out_of_domain") if name in texts}
    windows = data.consecutive_windows(data.tokenize(tokenizer, texts["in_domain"]), 8, 128)
    reference = {name: masked_sentence_embeddings(models["original"], tokenizer, s) for name, s in sentences.items()}
    measured = {}
    for name, model in models.items():
        row = {}
        for text, chosen in sentences.items():
            embeddings = masked_sentence_embeddings(model, tokenizer, chosen)
            label = "cosine" if text == "in_domain" else "cosine_other_text"
            row[label] = float((embeddings * reference[text]).sum(-1).mean())
        row["sentences"] = len(sentences["in_domain"])
        row["tokens_per_second"] = tokens_per_second(model, windows, 8, repeats=5)
        measured[name] = row
    return measured


def markdown(results: dict) -> str:
    lines = []
    for key, result in results["models"].items():
        rows = result["rows"]
        original = rows["original"]
        causal = key == "smollm2"
        quality = ["perplexity", "ppl (other text)", "KL"] if causal else ["cosine", "cosine (other text)"]
        header = ["method", "pruned", "parameters", "weights MiB", *quality, "tokens/s", "speed-up", "train s"]
        lines += [f"**{MODELS[key]['alias']}**, {MODELS[key]['sparsity']:.0%} of MLP channels and attention heads, "
                  f"{result['steps']} training steps per method (budget {result['minutes']:g} min from a "
                  f"{result['seconds_per_step_probe']:.1f} s/step probe; {result.get('threads', 1)} thread(s), "
                  f"{result.get('jobs', 1)} method(s) trained at once; made by `{result.get('command', '?')}`)", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
        for name, row in rows.items():
            pruned = ", ".join(f"{k.split('_')[-1]} {v}" for k, v in row.get("pruned", {}).items()) or "-"
            if causal:
                cells = [
                    f"{row['perplexity']:.2f}",
                    _f(row.get("perplexity_other_text"), 2),
                    f"{row['kl_to_original']:.3f}",
                ]
            else:
                cells = [f"{row['cosine']:.4f}", _f(row.get("cosine_other_text"), 4)]
            lines.append("| " + " | ".join([
                name, pruned, f"{row['parameters'] / 1e6:.1f}M ({row['parameters'] / original['parameters']:.0%})",
                f"{row['weight_bytes'] / 2**20:.1f}", *cells, f"{row['tokens_per_second']:.0f}",
                f"{row['tokens_per_second'] / original['tokens_per_second']:.2f}x", _f(row.get("train_seconds"), 0),
            ]) + " |")  # fmt: skip
        lines.append("")
    texts = next(iter(results["models"].values()))["texts"]
    lines.append(f"Texts: {'; '.join(f'{k}: {v}' for k, v in texts.items())}. {results['cpus']} cores on the "
                 "machine, shared with other work. Weights: float16 safetensors.")  # fmt: skip
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    readme = ROOT / "docs" / "pruning.md"
    text = readme.read_text()
    start, end = "<!-- prune-bench:start -->", "<!-- prune-bench:end -->"
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = f"{start}\n_Generated by scripts/bench_prune.py on {time.strftime('%Y-%m-%d')}; each table names the "
    body += f"command that made it._\n\n{table}{end}"
    readme.write_text(head + body + tail)


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
