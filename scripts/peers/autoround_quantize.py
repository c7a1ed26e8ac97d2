"""Quantize a model's linear layers with AutoRound (signed-gradient rounding and clipping, calibrated block by block),
optionally with its AutoScheme choosing each layer's bits for an average, and write the dequantized weights as a
plain Hugging Face directory, so the benchmark evaluates it with our code and windows. The size counts what
AutoRound's export packs per layer (the codes, a 16-bit scale and a zero point of the layer's bits per group) and
every other tensor at 16 bits, as for the HQQ row.

Runs in the peers' own virtual environment (bench/.venv-peers), never in ours.

    python scripts/peers/autoround_quantize.py --model DIR --out DIR --bits 3 --group-size 64 \
        --calibration windows.safetensors [--avg-bits 2.5] [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bits", type=int, required=True, help="the bits of every layer (without --avg-bits)")
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--calibration", required=True, help="safetensors file with an int64 `input_ids` [n, seq_len]")
    parser.add_argument("--avg-bits", type=float, help="AutoScheme: choose each layer among 2, 3, 4 bits for this "
                        "average (scales and zero points counted)")  # fmt: skip
    parser.add_argument("--iters", type=int, default=50, help="AutoRound's tuning steps per block (0: its RTN)")
    parser.add_argument("--scheme-samples", type=int, default=16, help="AutoScheme's calibration windows")
    args = parser.parse_args()

    import auto_round
    from auto_round import AutoRound, AutoScheme
    from auto_round.schemes import QuantizationScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = load_file(args.calibration)["input_ids"]
    samples, seq_len = ids.shape
    work = Path(tempfile.mkdtemp(prefix="autoround-"))
    try:
        # AutoRound takes local calibration text as a JSON file of strings, tokenized again to `seq_len`
        calibration = work / "calibration.json"
        calibration.write_text(json.dumps([tokenizer.decode(row) for row in ids.tolist()]))

        def scheme(bits: int) -> QuantizationScheme:
            return QuantizationScheme(bits=bits, group_size=args.group_size, sym=False, data_type="int", act_bits=16)

        if args.avg_bits is not None:
            chosen = AutoScheme(avg_bits=args.avg_bits, options=[scheme(b) for b in (2, 3, 4)],
                                nsamples=args.scheme_samples, seqlen=seq_len, dataset=str(calibration),
                                device_map="cpu", enable_torch_compile=False)  # fmt: skip
        else:
            chosen = scheme(args.bits)
        started = time.perf_counter()
        rounder = AutoRound(model, tokenizer, scheme=chosen, dataset=str(calibration), nsamples=samples,
                            seqlen=seq_len, iters=args.iters, batch_size=8, device_map="cpu",
                            enable_torch_compile=False, seed=0)  # fmt: skip
        model, layer_config = rounder.quantize()
        seconds = time.perf_counter() - started
        out = Path(args.out)
        model.save_pretrained(out)  # the linear weights hold AutoRound's quantized-dequantized values
        tokenizer.save_pretrained(out)
        quantized = {name: entry for name, entry in layer_config.items() if int(entry.get("bits", 16)) < 16}
        weights = sum(model.get_submodule(name).weight.numel() for name in quantized if _has(model, name))
        stored = sum(_stored_bits(model.get_submodule(name).weight.shape, int(entry["bits"]), args.group_size)
                     for name, entry in quantized.items() if _has(model, name))  # fmt: skip
        names = {f"{name}.weight" for name in quantized}
        others = sum(2 * p.numel() for n, p in model.named_parameters() if n not in names)
        checkpoint_bytes = stored // 8 + others
        bits_chosen = {}
        for entry in quantized.values():
            bits_chosen[int(entry["bits"])] = bits_chosen.get(int(entry["bits"]), 0) + 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "peer.json").write_text(
        json.dumps(
            {
                "tool": "auto-round",
                "version": auto_round.__version__,
                "method": "autoscheme" if args.avg_bits is not None else "autoround",
                "bits": args.bits,
                "avg_bits": args.avg_bits,
                "layers_by_bits": {str(b): n for b, n in sorted(bits_chosen.items())},
                "group_size": args.group_size,
                "iters": args.iters,
                "calibration_samples": samples,
                "quantized_layers": len(quantized),
                "bits_per_weight": stored / weights,
                "checkpoint_bytes": checkpoint_bytes,
                "seconds": seconds,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


def _has(model: torch.nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), torch.nn.Linear)
    except AttributeError:
        return False


def _stored_bits(shape: torch.Size, bits: int, group_size: int) -> int:
    """A layer's codes plus a 16-bit scale and a `bits`-bit zero point per group, as AutoRound packs them."""
    rows, columns = shape
    groups = rows * -(-columns // group_size)
    return rows * columns * bits + groups * (16 + bits)


if __name__ == "__main__":
    main()
