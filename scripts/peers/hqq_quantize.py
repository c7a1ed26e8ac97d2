"""Quantize a model's linear layers with HQQ (half-quadratic quantization, calibration-free) and write the
dequantized weights as a plain Hugging Face directory, so the benchmark evaluates it with our code and windows.

Runs in the peers' own virtual environment (bench/.venv-peers), never in ours.

    python scripts/peers/hqq_quantize.py --model DIR --out DIR --bits 3 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    args = parser.parse_args()

    import hqq
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size)
    started = time.perf_counter()
    stored_bytes = 0
    weights = 0
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        for name, linear in layers:
            shape, bias = linear.weight.shape, linear.bias
            replacement = torch.nn.Linear(shape[1], shape[0], bias=bias is not None)
            quantized = HQQLinear(linear, quant_config=config, compute_dtype=torch.float32, device="cpu")
            dense = quantized.dequantize().reshape(shape)
            # packed codes as HQQ stores them, scale and zero per group in a 16-bit model's dtype
            stored_bytes += quantized.W_q.numel() * quantized.W_q.element_size()
            stored_bytes += 2 * (quantized.meta["scale"].numel() + quantized.meta["zero"].numel())
            weights += shape.numel()
            replacement.weight.copy_(dense)
            if bias is not None:
                replacement.bias.copy_(bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement)
    seconds = time.perf_counter() - started
    quantized_names = {f"{n}.weight" for n, _ in layers}
    others = sum(2 * p.numel() for n, p in model.named_parameters() if n not in quantized_names)
    out = Path(args.out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
    (out / "peer.json").write_text(
        json.dumps(
            {
                "tool": "hqq",
                "version": hqq.__version__,
                "method": "hqq",
                "bits": args.bits,
                "group_size": args.group_size,
                "calibration_samples": 0,
                "quantized_layers": len(layers),
                "bits_per_weight": 8 * stored_bytes / weights,
                "checkpoint_bytes": stored_bytes + others,
                "seconds": seconds,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
