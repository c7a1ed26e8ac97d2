"""Scale benchmark: compress a model that does not fit the memory budget, streamed block by block.

    python scripts/bench_scale.py                    # writes the model once (about 5.9 GB), then runs both recipes
    python scripts/bench_scale.py --only rtn --keep  # keep the model directory for another run

1. Writes a randomly initialised Llama-style model of about 1.46B parameters (hidden 2048, 28 blocks, MLP 5632,
   32 query and 8 key-value heads, vocabulary 49152 with the SmolLM2 tokenizer) as float32 safetensors shards of
   about 1 GB, one tensor at a time (the script itself never holds the model).
2. Runs `compress run --max-memory 2.5GB` with round-to-nearest W4 g128 and with nupes data-free W4 g64, each in
   its own process; the memory plan decides to stream. Peak RSS is the larger of the kernel's figure for that
   process (`wait4`) and the run's own report (VmHWM), next to the plan's estimate.
3. Checks the result: `compress.load` of the checkpoint (the transformers path, all shards) against a reference
   computed block by block from the checkpoint's shards (each compressed layer dequantized by its format into a
   plain Llama block), on 64 tokens; and how far the first block's dequantized weights are from the original's.

Writes bench/scale/results.json and results.md, and rewrites the section of docs/operations.md between the
`scale-bench:start` / `scale-bench:end` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "scale"
BUDGET = "2.5GB"
CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=28, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
              rms_norm_eps=1e-5)  # fmt: skip
RECIPES = {
    "rtn": [{"stage": "rtn", "bits": 4, "group_size": 128}],
    "nupes": [{"stage": "nupes", "mode": "data-free", "bits": 4, "group_size": 64}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(RECIPES), help="one recipe only")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "scale-work", help="model and outputs")
    parser.add_argument("--keep", action="store_true", help="keep the model directory afterwards")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument(
        "--estimates-only",
        action="store_true",
        help="recompute the plan's estimates of the last "
        "results (after a change to compress/memory_plan.py) and rewrite the table; nothing is run",
    )
    args = parser.parse_args()
    if args.estimates_only:
        results = json.loads((OUT / "results.json").read_text())
        for name, run in results["runs"].items():
            run["estimate_bytes"] = plan_estimate(args.work / f"{name}.yaml")
        finish(results, args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "model"
    if not (model_dir / "model.safetensors.index.json").is_file():
        write_random_llama(model_dir)
    results = {"model": describe(model_dir), "budget": BUDGET, "machine": machine(), "runs": {}}
    previous = OUT / "results.json"
    if previous.is_file() and args.only:
        results["runs"] = json.loads(previous.read_text()).get("runs", {})
    for name in [args.only] if args.only else list(RECIPES):
        results["runs"][name] = run(name, model_dir, args.work)
        print(json.dumps(results["runs"][name], indent=2), flush=True)
    finish(results, args)
    if not args.keep:
        shutil.rmtree(model_dir, ignore_errors=True)


def finish(results: dict, args: argparse.Namespace) -> None:
    write_results(OUT, results, markdown(results), "scale-bench", readme=not args.no_readme)


def write_results(out: Path, results: dict, table: str, marker: str, readme: bool) -> None:
    """results.json and results.md under `out`; the table also into docs/operations.md between the `marker` comments."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table)
    print(table)
    if readme:
        path = ROOT / "docs" / "operations.md"
        text = path.read_text()
        pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.DOTALL)
        if pattern.search(text):
            path.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))


def write_random_llama(path: Path, shard_bytes: int = 2**30) -> None:
    """Float32 shards of a random Llama written tensor by tensor, with its config and the SmolLM2 tokenizer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.models import embedded_path

    temporary = path.with_name(path.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    config = LlamaConfig(**CONFIG)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files = []

    def flush() -> None:
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        save_file(shards[-1], str(temporary / files[-1]), metadata={"format": "pt"})
        shards[-1] = {}
        sizes[-1] = 0

    weight_map = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        if sizes[-1] + tensor.numel() * 4 > shard_bytes and shards[-1]:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += tensor.numel() * 4
        weight_map[name] = len(files)
    flush()
    count = len(files)
    final = {i: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)}
    for i, name in enumerate(files):
        (temporary / name).rename(temporary / final[i])
    index = {"metadata": {"total_size": sum(4 * shape.numel() for shape in shapes.values())},
             "weight_map": {name: final[i] for name, i in weight_map.items()}}  # fmt: skip
    (temporary / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(temporary)
    gguf = embedded_path("smollm2-135m")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(temporary)
    shutil.rmtree(path, ignore_errors=True)
    temporary.rename(path)


def describe(model_dir: Path) -> dict:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    parameters = index["metadata"]["total_size"] // 4
    return {"parameters": parameters, "float32_bytes": parameters * 4, "shards": len(files), **CONFIG}


def run(name: str, model_dir: Path, work: Path) -> dict:
    import yaml

    out = work / f"out-{name}"
    recipe = {
        "model": str(model_dir),
        "data": {"evaluation": {"num_windows": 2, "seq_len": 128, "batch_size": 2}},
        "stages": RECIPES[name],
        "export": {"out": str(out)},
    }
    recipe_path = work / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "compress", "-v", "run", str(recipe_path), "--force", "--max-memory", BUDGET]
    estimate = plan_estimate(recipe_path)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # the child's own peak RSS, as the kernel counted it
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: compress run failed:\n{output[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    result = {
        "command": " ".join(["python -m compress run", f"{name}.yaml", "--max-memory", BUDGET]),
        "seconds": round(seconds, 1),
        "peak_rss_bytes_report": report["total"]["peak_rss_bytes"],
        "peak_rss_bytes_kernel": usage.ru_maxrss * 1024,
        "estimate_bytes": estimate,
        "streamed": bool(report["model"].get("streamed")),
        "bits_per_weight": report["after"]["bits_per_weight"],
        "checkpoint_bytes": report["size"]["checkpoint_bytes"],
        "perplexity_before": report["before"].get("perplexity"),
        "perplexity_after": report["after"].get("perplexity"),
        "kl_to_original": report["after"].get("kl_to_original"),
    }
    result.update(check_logits(out, model_dir))
    return result


def plan_estimate(recipe_path: Path) -> int:
    from compress.memory_plan import parse_size, plan_memory
    from compress.recipe import load_recipe

    plan = plan_memory(load_recipe(recipe_path), parse_size(BUDGET), stream=False)
    return plan.total(plan.streamed if plan.stream else plan.in_memory)


@torch.no_grad()
def check_logits(out: Path, model_dir: Path) -> dict:
    """`compress.load` logits against a block-by-block reference built from the checkpoint's shards."""
    import compress
    from compress.registry import FORMATS

    ids = torch.randint(0, CONFIG["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    loaded = compress.load(out)
    load_seconds = time.perf_counter() - started
    logits = loaded(input_ids=ids).logits
    del loaded
    config_data = json.loads((out / "config.json").read_text())
    layers = config_data["quantization_config"]["layers"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors import safe_open
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    def tensor(name: str) -> torch.Tensor:
        with safe_open(str(out / index[name]), "pt") as handle:
            return handle.get_tensor(name)

    def dense(name: str) -> torch.Tensor:
        settings = layers[name]
        module = FORMATS[settings["format"]].empty(settings["in_features"], settings["out_features"], False, settings)
        module.load_state_dict({key: tensor(f"{name}.{key}") for key in module.state_dict()})
        return module.dequantize().float()

    config = LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"  # plain softmax attention with the explicit causal mask below
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    hidden = tensor("model.embed_tokens.weight").float()[ids]
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rotary = LlamaRotaryEmbedding(config)
    position_embeddings = rotary(hidden, positions)
    weight_error = None
    for block in range(CONFIG["num_hidden_layers"]):
        layer = LlamaDecoderLayer(config, block).eval()
        state = {}
        for key in layer.state_dict():
            full = f"model.layers.{block}.{key}"
            owner = full.removesuffix(".weight")
            state[key] = dense(owner) if owner in layers else tensor(full).float()
        layer.load_state_dict(state)
        if block == 0:
            with safe_open(
                str(model_dir / _source_file(model_dir, "model.layers.0.self_attn.q_proj.weight")), "pt"
            ) as f:
                original = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
            quantized = state["self_attn.q_proj.weight"]
            weight_error = float((quantized - original).pow(2).sum() / original.pow(2).sum())
        hidden = layer(hidden, attention_mask=causal, position_embeddings=position_embeddings, position_ids=positions)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    norm = LlamaRMSNorm(CONFIG["hidden_size"], eps=CONFIG["rms_norm_eps"])
    norm.weight.copy_(tensor("model.norm.weight").float())
    reference = norm(hidden) @ tensor("lm_head.weight").float().T
    difference = float((logits - reference).abs().max())
    return {
        "logits_max_abs_difference": difference,
        "logits_max_abs": float(reference.abs().max()),
        "load_seconds": round(load_seconds, 1),
        "block0_q_proj_relative_weight_error": weight_error,
    }


def _source_file(model_dir: Path, name: str) -> str:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"][name]


def machine() -> dict:
    import transformers

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpus": os.cpu_count(), "memory_bytes": memory}  # fmt: skip


def markdown(results: dict) -> str:
    model = results["model"]
    lines = [
        f"Random Llama-style model, {model['parameters'] / 1e9:.2f}B parameters ({model['float32_bytes'] / 2**30:.1f} "
        f"GiB in float32, {model['shards']} shards), `compress run --max-memory {results['budget']}` on "
        f"{results['machine']['cpus']} CPUs (`python scripts/bench_scale.py`):",
        "",
        "| recipe | streamed | peak RSS | plan's estimate | wall time | bits/weight | checkpoint | "
        "logits vs block-by-block reference (max abs diff) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in results["runs"].items():
        peak = max(run["peak_rss_bytes_kernel"], run["peak_rss_bytes_report"])
        lines.append(
            f"| {name} | {'yes' if run['streamed'] else 'no'} | {peak / 2**30:.2f} GiB | "
            f"{run['estimate_bytes'] / 2**30:.2f} GiB | {run['seconds']:.0f} s | {run['bits_per_weight']:.3f} | "
            f"{run['checkpoint_bytes'] / 2**30:.2f} GiB | {run['logits_max_abs_difference']:.2e} "
            f"(logits up to {run['logits_max_abs']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
