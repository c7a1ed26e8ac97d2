"""Quantize a model with llm-compressor (round-to-nearest or GPTQ) and write its dequantized weights as a plain
Hugging Face directory, so the benchmark evaluates it with the same code and windows as our checkpoints.

Runs in the peers' own virtual environment (bench/.venv-peers), never in ours.

    python scripts/peers/llmcompressor_quantize.py --model DIR --out DIR --method gptq --bits 3 --group-size 64 \
        --calibration windows.safetensors
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", choices=["rtn", "gptq"], required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--calibration", help="safetensors file with an int64 `input_ids` [n, seq_len] tensor")
    args = parser.parse_args()

    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    weights = QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=False, strategy="group", group_size=args.group_size
    )
    scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    started = time.perf_counter()
    if args.method == "rtn":
        oneshot(model=model, recipe=[QuantizationModifier(config_groups=scheme, ignore=["lm_head"])])
        samples = 0
    else:
        import datasets

        ids = load_file(args.calibration)["input_ids"]
        samples = len(ids)
        dataset = datasets.Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
        )
        oneshot(
            model=model,
            dataset=dataset,
            recipe=[GPTQModifier(config_groups=scheme, ignore=["lm_head"], dampening_frac=0.01)],
            num_calibration_samples=samples,
            max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False,
        )
    seconds = time.perf_counter() - started

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    quantized_layers = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme_of = getattr(module, "quantization_scheme", None)
            if scheme_of is None or getattr(module, "weight_scale", None) is None:
                continue
            weight = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, scheme_of.weights)
            dense.get_submodule(name).weight.copy_(weight)
            quantized_layers += 1
    out = Path(args.out)
    dense.save_pretrained(out)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
    # The checkpoint a user of llm-compressor ships (packed int weights), for its size and bits per weight.
    layer_shapes = {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if getattr(module, "quantization_scheme", None) is not None
    }
    compressed = out / "compressed"
    model.save_pretrained(compressed, save_compressed=True)  # compresses the modules in place
    bits_per_weight, checkpoint_bytes = _stored_bits(compressed, layer_shapes)
    (out / "peer.json").write_text(
        json.dumps(
            {
                "tool": "llmcompressor",
                "version": llmcompressor.__version__,
                "method": args.method,
                "bits": args.bits,
                "group_size": args.group_size,
                "calibration_samples": samples,
                "quantized_layers": quantized_layers,
                "bits_per_weight": bits_per_weight,
                "checkpoint_bytes": checkpoint_bytes,
                "seconds": seconds,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


def _stored_bits(directory: Path, layer_shapes: dict[str, tuple[int, int]]) -> tuple[float, int]:
    """Bits stored per weight over the quantized layers (every tensor of the layer but its bias), read from the
    safetensors headers; and the checkpoint's size. A float32 model makes llm-compressor write float32 scales
    and unquantized tensors; every float tensor is counted at 16 bits, as the same model in float16/bfloat16
    would store it."""
    from safetensors import safe_open

    sizes = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = handle.get_slice(key)
                itemsize = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1}[tensor.get_dtype()]
                if tensor.get_dtype() in ("F32", "F16", "BF16"):
                    itemsize = 2
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                sizes[key] = count * itemsize
    stored = sum(
        size for key, size in sizes.items() if key.rpartition(".")[0] in layer_shapes and not key.endswith(".bias")
    )
    weights = sum(rows * cols for rows, cols in layer_shapes.values())
    others = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and f.suffix != ".safetensors")
    return 8 * stored / weights, sum(sizes.values()) + others


if __name__ == "__main__":
    main()
