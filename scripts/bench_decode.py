"""Deployment speed of compressed checkpoints against the dense model they replace, as users run them: batch-1
greedy decode (a short prompt, then `--new-tokens` tokens through the KV cache), a 512-token prefill, and resident
memory after loading, every model in a fresh process, one after another, with the same threads.

    python scripts/bench_decode.py                 # build the checkpoints (cached), measure, write the tables
    python scripts/bench_decode.py --table-only    # rewrite bench/decode/results.md and docs/runtime.md from results

Speed depends on a checkpoint's format and settings, not on the values its stage learned, so the checkpoints
here are made with each recipe's format settings and the learning switched off (`nupes` data-free, `jlcm` with
no learning steps and no refit); the table says so. Writes bench/decode/results.json and results.md, and the
section of docs/runtime.md between the `decode-bench:start` / `decode-bench:end` markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "decode"
CACHE = ROOT / "bench" / "cache" / "decode"
MODEL = "smollm2-135m"

# name -> (recipe, --set overrides, what the row stands for)
CHECKPOINTS = {
    "rtn W4 g64": ("recipes/rtn-w4.yaml", [], "uniform 4-bit, groups of 64"),
    "nupes W4 g64": ("recipes/nupes-data-free-w4.yaml", [], "power 4-bit, groups of 64"),
    "nupes W3 g64": ("recipes/nupes-w3.yaml", ["stages.0.mode=data-free"], "power 3-bit, groups of 64"),
    "nupes W2 g64": ("recipes/nupes-w2.yaml", ["stages.0.mode=data-free"], "power 2-bit, groups of 64"),
    "jlcm 2-bit": ("recipes/jlcm-2bit.yaml", ["stages.0.steps=0", "stages.0.refit_rounds=0"],
                   "codebook 8-bit codes of 4 weights, kept columns"),
    "jlcm 2-bit, head 8-bit": ("recipes/jlcm-2bit-head8.yaml", ["stages.0.steps=0", "stages.0.refit_rounds=0"],
                               "as jlcm 2-bit; the output head (tied embedding) uniform 8-bit"),
    "jlcm 3-bit": ("recipes/jlcm-3bit.yaml", ["stages.0.steps=0", "stages.0.refit_rounds=0"],
                   "codebook 6/7/8-bit codes of 2 weights, kept columns"),
}  # fmt: skip
PROMPT = "The history of the printing press begins"
LLAMA_MEASURED = (
    "llama.cpp rows: llama-cpp-python built in this environment (`make bench-deps`), the same threads, the same "
    "prompt and 128 greedy tokens one `eval` call each, the same 512 random tokens in one `eval`; their checkpoint "
    "size is the GGUF file. llama.cpp's k-quants (Q3_K_S, Q2_K) need rows a multiple of 256 wide: most tensors of "
    "this model (576 wide) fall back to other types (llama.cpp's own warning), so those files are larger than the "
    "names say."
)
LLAMA_MISSING = "llama.cpp was not measured: llama-cpp-python is not installed (`make bench-deps` builds it)."


def build(name: str) -> Path:
    recipe, overrides, _ = CHECKPOINTS[name]
    out = CACHE / name.replace(" ", "-").lower()
    if (out / "report.json").is_file():
        return out
    command = [sys.executable, "-m", "compress", "run", recipe, "--no-eval", "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    print(f"building {name}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def measure(source: str, dtype: str, new_tokens: int) -> dict:
    """In this process: load `source` (a checkpoint directory, or the embedded model in `dtype`), then time it.
    The baseline is the process's own memory, the same for every row: libraries and the architecture's code
    imported, the tokenizer loaded; resident memory is read after loading and again after the runs (KV cache and
    every page the runs touched included)."""
    import importlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.eval import decode_speed, prefill_speed
    from compress.memory import resident_bytes
    from compress.models import is_compress_checkpoint, load_tokenizer, read_config, resolve_model

    compressed = is_compress_checkpoint(source)
    if compressed:
        from compress import load

        config, tokenizer = read_config(source, source), AutoTokenizer.from_pretrained(source)
    else:
        found = resolve_model(source)
        config = read_config(found.location, source, found.gguf_file)
        tokenizer = load_tokenizer(found.location, found.gguf_file, False)
    importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    dtype, _, variant = dtype.partition("+")
    baseline = resident_bytes()
    start = time.perf_counter()
    if compressed:
        model = load(source)
    else:
        model = AutoModelForCausalLM.from_pretrained(found.location, gguf_file=found.gguf_file,
                                                     dtype=getattr(torch, dtype))  # fmt: skip
    model.eval()
    if variant in ("fused", "nolinear"):  # the norms and attention as the compressed rows run them (prepare())
        from compress.runtime.attention import fuse_attention
        from compress.runtime.norms import fuse_norms

        fuse_norms(model)
        fuse_attention(model)
    if variant == "nolinear":  # every linear layer, the head included, a no-op: what the rest of a token costs

        class NoLinear(torch.nn.Module):
            def __init__(self, out_features: int) -> None:
                super().__init__()
                self.out_features = out_features

            def forward(self, x):
                return x.new_zeros(*x.shape[:-1], self.out_features)

        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, torch.nn.Linear):
                    parent._modules[name] = NoLinear(child.out_features)
    load_seconds = time.perf_counter() - start
    resident = resident_bytes()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    decode, ids = decode_speed(model, prompt, new_tokens)
    ids_512 = torch.randint(0, len(tokenizer), (1, 512), generator=torch.Generator().manual_seed(0))
    prefill = prefill_speed(model, ids_512)
    return {
        "decode_tokens_per_second": decode,
        "prefill_tokens_per_second": prefill,
        "load_seconds": load_seconds,
        "baseline_rss_bytes": baseline,
        "loaded_rss_bytes": resident,
        "resident_bytes": resident_bytes(),
        "threads": torch.get_num_threads(),
        "text": tokenizer.decode(ids[0, prompt.shape[1] :], skip_special_tokens=True)[:120],
    }


def embedded_gguf() -> Path:
    """The shipped GGUF of the embedded model (Q4_1): the file the dense original is dequantized from."""
    from compress.models import embedded_path

    return embedded_path(MODEL)


def llama_cpp_models() -> list[tuple[str, Path, str]]:
    """llama.cpp on the same model, as a CPU runtime a user would pick instead: the shipped Q4_1 GGUF, and Q3_K_S
    and Q2_K made from it by llama.cpp's own quantizer (requantized from Q4_1: there is no float GGUF of the model
    here; speed depends on the type, not on the values). [] where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return []
    shipped = embedded_gguf()
    models = [("llama.cpp Q4_1", shipped, "GGUF Q4_1 (shipped), llama-cpp-python " + llama_cpp.__version__)]
    for kind, code in (("Q3_K_S", 11), ("Q2_K", 10)):
        target = CACHE / f"smollm2-135m-{kind}.gguf"
        if not target.is_file():
            CACHE.mkdir(parents=True, exist_ok=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = code
            params.allow_requantize = True
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(shipped).encode(), str(target).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {shipped} to {kind}")
        version = llama_cpp.__version__
        models.append((f"llama.cpp {kind}", target, f"GGUF {kind} (from Q4_1), llama-cpp-python {version}"))
    return models


def measure_llama_cpp(path: str, new_tokens: int) -> dict:
    """In this process: llama.cpp's decode (greedy, batch 1, one token per call) and 512-token prefill of `path`."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    from compress.memory import resident_bytes

    threads = torch.get_num_threads()
    baseline = resident_bytes()
    start = time.perf_counter()
    model = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_seconds = time.perf_counter() - start
    loaded = resident_bytes()
    prompt, vocab = model.tokenize(PROMPT.encode(), add_bos=False), model.n_vocab()

    def decode(count: int) -> tuple[float, list[int]]:
        model.reset()
        model.eval(prompt)
        out: list[int] = []
        begin = time.perf_counter()
        for _ in range(count):  # the last token's logits, as llama.cpp left them
            token = int(np.argmax(np.ctypeslib.as_array(model._ctx.get_logits(), shape=(vocab,))))
            out.append(token)
            model.eval([token])
        return count / (time.perf_counter() - begin), out

    decode(2)
    speed, out = decode(new_tokens)
    ids = torch.randint(0, model.n_vocab(), (512,), generator=torch.Generator().manual_seed(0)).tolist()
    best = float("inf")
    for _ in range(2):
        model.reset()
        begin = time.perf_counter()
        model.eval(ids)
        best = min(best, time.perf_counter() - begin)
    return {
        "decode_tokens_per_second": speed,
        "prefill_tokens_per_second": 512 / best,
        "load_seconds": load_seconds,
        "baseline_rss_bytes": baseline,
        "loaded_rss_bytes": loaded,
        "resident_bytes": resident_bytes(),
        "threads": threads,
        "text": model.detokenize(out).decode(errors="replace")[:120],
    }


def run_isolated(source: str, dtype: str, new_tokens: int) -> dict:
    command = [sys.executable, __file__, "--measure", source, "--dtype", dtype, "--new-tokens", str(new_tokens)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"measuring {source} ({dtype}) failed with exit code {done.returncode}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "compress"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def table(results: dict) -> str:
    rows = results["rows"]
    dense = next(r for r in rows if r["name"] == "dense float32")
    lines = [
        f"_Generated by `{results['command']}` at commit {results['commit']} on {results['date']}; "
        f"{results['machine']}, {dense['threads']} threads, every model in a fresh process, one at a time._",
        "",
        "| model | format | checkpoint MiB | resident MiB loaded | resident MiB after runs | decode tok/s | vs fp32 "
        "| prefill tok/s | vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        size = f"{row['checkpoint_bytes'] / 2**20:.1f}" if row.get("checkpoint_bytes") else "-"
        resident = (row["resident_bytes"] - row["baseline_rss_bytes"]) / 2**20
        loaded = "-"
        if "loaded_rss_bytes" in row:
            loaded = f"{(row['loaded_rss_bytes'] - row['baseline_rss_bytes']) / 2**20:.0f}"
        decode, prefill = row["decode_tokens_per_second"], row["prefill_tokens_per_second"]
        lines.append(
            f"| {row['name']} | {row['format']} | {size} | {loaded} | {resident:.0f} | {decode:.1f} "
            f"| {decode / dense['decode_tokens_per_second']:.2f}x | {prefill:.0f} "
            f"| {prefill / dense['prefill_tokens_per_second']:.2f}x |"
        )
    lines += [
        "",
        f"Decode: the prompt {PROMPT!r}, then {results['new_tokens']} greedy tokens at batch 1 (`model.generate`); "
        f"best of {len(rows[0].get('rounds', [0]))} rounds in alternating order (the machine's speed drifts). "
        "Prefill: one forward over 512 tokens at batch 1. Resident: RSS after loading, and after the runs (KV cache, "
        "every page they touched and what the allocator kept of the prefill's activations included), minus the RSS "
        "of the same process before loading, with torch, transformers, compress, the architecture's code and the "
        "tokenizer loaded (llama.cpp: with llama_cpp imported). Compressed "
        "checkpoints are made with each recipe's format settings and learning switched off (speed depends on the "
        f"format, not the learned values). {results['llama_cpp']}",
    ]
    return "\n".join(lines) + "\n"


def write_docs(markdown: str) -> None:
    page = ROOT / "docs" / "runtime.md"
    text = page.read_text()
    start, end = "<!-- decode-bench:start -->", "<!-- decode-bench:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        page.write_text(head + start + "\n" + markdown + rest[rest.index(end) :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each model, best kept")
    parser.add_argument("--only", help="comma-separated checkpoint names (default: all)")
    args = parser.parse_args()
    if args.measure:
        found = (measure_llama_cpp(args.measure, args.new_tokens) if args.dtype == "gguf"
                 else measure(args.measure, args.dtype, args.new_tokens))  # fmt: skip
        print(json.dumps(found))
        return 0
    results_file = OUT / "results.json"
    if not args.table_only:
        names = args.only.split(",") if args.only else list(CHECKPOINTS)
        checkpoints = {name: build(name) for name in names}
        models = [
            ("dense float32", MODEL, "float32", "original", None),
            ("dense bfloat16", MODEL, "bfloat16", "original", None),
            ("dense float32, fused", MODEL, "float32+fused", "original, its norms and attention as the compressed "
             "rows run them", None),
            ("no linear layers", MODEL, "float32+nolinear", "as fused, every linear layer and the head a no-op: "
             "the rest of a token's work", None),
        ]  # fmt: skip
        models += [(name, str(directory), "float32", CHECKPOINTS[name][2],
                    sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()))
                   for name, directory in checkpoints.items()]  # fmt: skip
        peers = llama_cpp_models() if not args.only else []
        for name, path, _ in peers:  # a build that cannot run fails here, not after the rounds of every other row
            print(f"checking {name}", flush=True)
            run_isolated(str(path), "gguf", 2)
        models += [(name, str(path), "gguf", fmt, path.stat().st_size) for name, path, fmt in peers]
        # The machine's speed drifts by tens of percent between minutes: every model is measured in `--rounds`
        # rounds, in alternating order, and keeps its best decode and prefill.
        best: dict[str, dict] = {}
        for round_index in range(args.rounds):
            for name, source, dtype, fmt, size in models if round_index % 2 == 0 else models[::-1]:
                print(f"measuring {name} (round {round_index + 1})", flush=True)
                found = run_isolated(source, dtype, args.new_tokens)
                sized = {"checkpoint_bytes": size} if size else {}
                row = best.setdefault(name, {"name": name, "format": fmt, **sized, **found, "rounds": []})
                row["rounds"].append({k: found[k] for k in ("decode_tokens_per_second", "prefill_tokens_per_second")})
                for key in ("decode_tokens_per_second", "prefill_tokens_per_second"):
                    row[key] = max(row[key], found[key])
        rows = [best[name] for name, *_ in models]
        results = {
            "command": "python scripts/bench_decode.py"
            + (f" --only {args.only}" if args.only else "")
            + (f" --rounds {args.rounds}" if args.rounds != 3 else ""),
            "commit": commit(),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "new_tokens": args.new_tokens,
            "llama_cpp": LLAMA_MEASURED if peers else LLAMA_MISSING,
            "rows": rows,
        }
        OUT.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    results = json.loads(results_file.read_text())
    markdown = table(results)
    (OUT / "results.md").write_text(markdown)
    write_docs(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
