"""Offload benchmark: peak memory of a data-driven run whose calibration activations outweigh its model, with the
activations in memory and on disk (`--offload-activations`).

    python scripts/bench_offload.py

A random Llama-style model, narrow so that activations dominate (hidden 256, MLP 256, 4 blocks, the SmolLM2
tokenizer and vocabulary), compressed by `nupes` data-driven W4 g64 on 2048 calibration windows of 256 tokens
(524k tokens: 512 MiB of hidden states per copy), each mode in its own process. Peak RSS is the kernel's figure for
the process (`wait4`); the two checkpoints must be byte-identical.

Writes bench/offload/results.json and results.md, and rewrites the section of docs/operations.md between the
`offload-bench:start` / `offload-bench:end` markers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "offload"
CONFIG = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=49152, max_position_embeddings=512,
              tie_word_embeddings=True)  # fmt: skip
CALIBRATION = {"num_samples": 2048, "seq_len": 256}
STAGE = {"stage": "nupes", "mode": "data-driven", "bits": 4, "group_size": 64, "steps": 4, "batch_size": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "offload-work")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model_dir = write_model(args.work / "model")
    runs = {}
    for mode, flags in {"in memory": [], "offloaded": ["--offload-activations"]}.items():
        out = args.work / mode.replace(" ", "-")
        recipe = {"model": str(model_dir), "data": {"calibration": CALIBRATION}, "stages": [STAGE],
                  "export": {"out": str(out)}}  # fmt: skip
        path = args.work / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        command = [sys.executable, "-m", "compress", "run", str(path), "--no-eval", "--force", *flags]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)
        stderr = process.stderr.read()
        if status != 0:
            sys.exit(f"{mode} failed:\n{stderr[-3000:]}")
        runs[mode] = {"peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": time.perf_counter() - started,
                      "command": " ".join(["compress", "run", path.name, "--no-eval", *flags])}  # fmt: skip
        print(mode, runs[mode], flush=True)
    identical = all(
        (args.work / "in-memory" / name).read_bytes() == (args.work / "offloaded" / name).read_bytes()
        for name in ("model.safetensors", "config.json")
    )
    activations = CALIBRATION["num_samples"] * CALIBRATION["seq_len"] * CONFIG["hidden_size"] * 4
    results = {"config": CONFIG, "calibration": CALIBRATION, "stage": STAGE, "activation_copy_bytes": activations,
               "runs": runs, "identical_checkpoints": identical, "cpus": os.cpu_count()}  # fmt: skip
    from bench_scale import write_results  # scripts/ is on the path when a script runs

    write_results(OUT, results, markdown(results), "offload-bench", readme=not args.no_readme)
    shutil.rmtree(args.work, ignore_errors=True)


def write_model(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.models import embedded_path

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)
    gguf = embedded_path("smollm2-135m")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
    return path


def markdown(results: dict) -> str:
    mib = results["activation_copy_bytes"] / 2**20
    lines = [
        f"Random Llama (hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} blocks), `nupes` data-driven W4 "
        f"g64 on {CALIBRATION['num_samples']} windows of {CALIBRATION['seq_len']} tokens ({mib:.0f} MiB of hidden "
        f"states per copy), `python scripts/bench_offload.py`, {results['cpus']} CPUs:",
        "",
        "| activations | peak RSS | time |",
        "|---|---|---|",
    ]
    for mode, run in results["runs"].items():
        lines.append(f"| {mode} | {run['peak_rss_bytes'] / 2**30:.2f} GiB | {run['seconds']:.0f} s |")
    same = "byte-identical" if results["identical_checkpoints"] else "DIFFERENT (a defect)"
    lines += ["", f"The two checkpoints are {same}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
