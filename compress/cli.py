"""`compress run|eval|inspect` (also `python -m compress`). User errors print one paragraph and exit with code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2  # bad input: recipe, model, data, checkpoint
EXIT_INTERNAL = 1


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    from compress.errors import CompressError

    try:
        return args.handler(args)
    except CompressError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as error:  # a fault of compress itself, not of the input: say so, keep the details for -v
        if args.verbose:
            raise
        print(
            f"internal error: {type(error).__name__}: {error}\n"
            "no output was written; rerun with -v for the traceback and please report it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _configure_logging(verbose: bool) -> None:
    """compress's own messages to stderr; the libraries keep their own handlers (configuring the root logger as
    well printed each of their lines twice)."""
    logger = logging.getLogger("compress")
    if not any(getattr(handler, "compress_cli", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.compress_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    from compress import __version__

    parser = argparse.ArgumentParser(prog="compress", description="Recipe-driven model compression.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    # -v also after the command (`compress run recipe.yaml -v`); absent there, it leaves the value before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **options) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], **options)

    run = command("run", help="compress a model with a recipe, evaluate it and export it")
    run.add_argument("recipe", help="YAML recipe file")
    run.add_argument("--model", help="hub id, local directory, .gguf file or embedded alias (overrides the recipe)")
    run.add_argument("--out", help="output checkpoint directory (overrides export.out)")
    run.add_argument("--format", choices=["packed", "dense"], help="export format (overrides export.format)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    _budget_options(run)
    run.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    run.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation (size is still reported)")
    run.add_argument(
        "--resume", action="store_true", help="continue a killed run from the stages and blocks it finished"
    )
    run.add_argument(
        "--stream",
        action="store_true",
        help="never hold the whole model: read each block from the safetensors shards in turn, write it out done",
    )
    run.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget (e.g. 2.5GB): stream when the model would not fit, refuse at the start if even that does "
        "not",
    )
    run.add_argument(
        "--offload-activations",
        action="store_true",
        help="keep calibration activations in files beside the output, one batch in memory at a time",
    )
    run.set_defaults(handler=_run)

    validate = command(
        "validate", help="check a recipe against its model's config (no weights read), listing every problem"
    )
    validate.add_argument("recipe", help="YAML recipe file")
    validate.add_argument("--model", help="check against this model instead of the recipe's")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    _budget_options(validate)
    validate.set_defaults(handler=_validate)

    schema = command("schema", help="print the JSON Schema of recipes")
    schema.set_defaults(handler=_schema)

    verify = command("verify", help="check a checkpoint's files, sha256 and tensor headers")
    verify.add_argument("checkpoint")
    verify.set_defaults(handler=_verify)

    evaluate = command("eval", help="perplexity, KL, size and speed of a checkpoint or any model")
    evaluate.add_argument("model", help="a compress checkpoint, or a hub id, directory, .gguf file or embedded alias")
    evaluate.add_argument("--against", metavar="ORIGINAL", help="also measure the KL to this model (same tokenizer)")
    evaluate.add_argument("--data", default="embedded", help="evaluation text: embedded, a file or a datasets name")
    evaluate.add_argument("--half", default="second", choices=["first", "second", "all"])
    evaluate.add_argument("--num-windows", type=int, default=32)
    evaluate.add_argument("--seq-len", type=int, default=512)
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    evaluate.add_argument("--no-speed", action="store_true", help="skip the decode and prefill timing")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.set_defaults(handler=_eval)

    generate = command(
        "generate", help="greedy text from a checkpoint or any model, with decode and prefill tokens/s at batch 1"
    )
    generate.add_argument("model", help="a compress checkpoint, or a hub id, directory, .gguf file or embedded alias")
    generate.add_argument("--prompt", default="The capital of France is", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (all of them: no stop)")
    generate.add_argument("--no-verify", action="store_true", help="skip the sha256 check of a checkpoint's files")
    generate.set_defaults(handler=_generate)

    inspect = command("inspect", help="per-layer format, bits per weight and error of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    inspect.set_defaults(handler=_inspect)
    return parser


def _budget_options(parser: argparse.ArgumentParser) -> None:
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--target-size", metavar="SIZE", help="the checkpoint's weight files must fit SIZE (e.g. "
                        "60MB), every tensor counted; sets the recipe's budget (needs an allocate stage)")  # fmt: skip
    budget.add_argument("--target-bits", metavar="BITS", type=float, help="average stored bits per weight of the "
                        "quantized layers (e.g. 2.5); sets the recipe's budget (needs an allocate stage)")  # fmt: skip


def _overrides(args: argparse.Namespace) -> dict:
    from compress.recipe import parse_override

    overrides = dict(parse_override(item) for item in args.set)
    for option, key in (("model", "model.name"), ("out", "export.out"), ("format", "export.format")):
        if getattr(args, option, None):
            overrides[key] = getattr(args, option)
    if getattr(args, "target_size", None):
        overrides["budget"] = {"size": args.target_size}
    if getattr(args, "target_bits", None) is not None:
        overrides["budget"] = {"bits_per_weight": args.target_bits}
    return overrides


def _recipe(args: argparse.Namespace):
    from compress.recipe import load_recipe

    return load_recipe(args.recipe, _overrides(args))


def _run(args: argparse.Namespace) -> int:
    import compress
    from compress.memory_plan import parse_size

    max_memory = parse_size(args.max_memory) if args.max_memory else None
    result = compress.run(
        args.recipe,
        overrides=_overrides(args),
        force=args.force,
        evaluate=not args.no_eval,
        resume=args.resume,
        stream=args.stream,
        max_memory=max_memory,
        offload=args.offload_activations,
    )
    report = result.report
    print(report.to_text())
    print(f"\nwrote {result.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from compress.validate import validate

    recipe = _recipe(args)
    result = validate(recipe)
    stages = ", ".join(
        s.name if n is None else f"{s.name} ({n} layers)"
        for s, n in zip(recipe.stages, result.layers_per_stage, strict=True)
    )
    print(f"{recipe.path}: valid for {recipe.model.name} ({result.architecture}); stages: {stages}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from compress.recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from compress.export import check_checkpoint

    check_checkpoint(Path(args.checkpoint))
    print(f"{args.checkpoint}: every file matches its recorded sha256, and the tensors match config.json")
    return 0


def _load_any(name: str, verify: bool):
    """A compress checkpoint, or any model `load_model` takes: `(model, tokenizer)`."""
    from compress.models import is_compress_checkpoint, load_model

    if is_compress_checkpoint(name):
        from transformers import AutoTokenizer

        from compress.export import load

        return load(name, verify=verify), AutoTokenizer.from_pretrained(name)
    loaded = load_model(name)
    return loaded.model, loaded.tokenizer


def _eval(args: argparse.Namespace) -> int:
    from compress import data as textdata
    from compress.errors import CompressError
    from compress.eval import (
        ReferenceCache,
        decode_speed,
        float16_weights_size,
        language_model_quality,
        prefill_speed,
        quantized_bits,
        weights_size,
    )
    from compress.models import is_compress_checkpoint

    for option in ("num_windows", "seq_len", "batch_size"):
        if getattr(args, option) < 1:
            raise CompressError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    reference = windows = None
    if args.against:
        original, tokenizer = _load_any(args.against, not args.no_verify)
        windows = _eval_windows(args, tokenizer, textdata)
        reference = ReferenceCache(len(windows), windows.shape[1] - 1, original.get_output_embeddings().out_features)
        language_model_quality(original, windows, args.batch_size, reference, record=True, desc="eval original")
        del original
    model, tokenizer = _load_any(args.model, not args.no_verify)
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise CompressError(f"model {args.model!r} is not a causal language model; eval measures perplexity")
    if windows is None:
        windows = _eval_windows(args, tokenizer, textdata)
    if reference is not None and model.get_output_embeddings().out_features != reference.logprobs.shape[-1]:
        raise CompressError(f"--against {args.against!r} has another vocabulary than {args.model!r}, so no KL "
                            "between them")  # fmt: skip
    quality = language_model_quality(model, windows, args.batch_size, reference)
    if reference is not None:
        reference.close()
    bits, weights = quantized_bits(model)
    checkpoint = is_compress_checkpoint(args.model)
    result = {
        "model": args.model,
        "text": f"{args.data} ({args.half} half), {len(windows)} windows of {windows.shape[1]} tokens",
        "perplexity": quality.perplexity,
        "log_perplexity_se": quality.log_perplexity_se,
        "kl_to_original": quality.kl_to_original,
        "tokens": quality.tokens,
        "bits_per_weight": bits if weights else None,
        "quantized_weights": weights,
        "size_bytes": weights_size(args.model) if checkpoint else float16_weights_size(model),
    }
    if not args.no_speed:
        result["decode_tokens_per_second"] = decode_speed(model, windows[:1, :16])[0]
        result["prefill_tokens_per_second"] = prefill_speed(model, windows[:1])
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    size_kind = "weight files" if checkpoint else "as float16"
    spread = "" if quality.log_perplexity_se is None else f" ±{100 * quality.log_perplexity_se:.1f}% (standard error)"
    rows = [("model", args.model), ("text", result["text"]), ("perplexity", f"{quality.perplexity:.3f}{spread}")]
    if quality.kl_to_original is not None:
        rows.append((f"KL to {args.against} (nats/token)", f"{quality.kl_to_original:.4f}"))
    rows.append(("bits per weight (quantized layers)", f"{bits:.3f}" if weights else "- (none quantized)"))
    rows.append((f"size ({size_kind})", f"{result['size_bytes'] / 2**20:.1f} MiB"))
    if not args.no_speed:
        rows.append(("decode tokens/s (batch 1)", f"{result['decode_tokens_per_second']:.1f}"))
        rows.append(("prefill tokens/s (batch 1)", f"{result['prefill_tokens_per_second']:.0f}"))
    width = max(len(label) for label, _ in rows)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows))
    return 0


def _eval_windows(args: argparse.Namespace, tokenizer, textdata):
    ids = textdata.select_half(textdata.tokenize(tokenizer, textdata.load_text(args.data)), args.half)
    return textdata.consecutive_windows(ids, args.num_windows, args.seq_len)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from compress.errors import CompressError
    from compress.eval import decode_speed, prefill_speed
    from compress.memory import resident_bytes

    if args.max_new_tokens < 1:
        raise CompressError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = _load_any(args.model, not args.no_verify)
    if getattr(model, "generate", None) is None or model.get_output_embeddings() is None:
        raise CompressError(f"model {args.model!r} is not a causal language model; generate needs one")
    resident = resident_bytes()
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
    if prompt.shape[1] == 0:
        raise CompressError("--prompt is empty after tokenization")
    decode, ids = decode_speed(model, prompt, args.max_new_tokens)
    prefill = prefill_speed(model, torch.randint(0, len(tokenizer), (1, 512)))
    print(tokenizer.decode(ids[0], skip_special_tokens=True))
    print(
        f"\ndecode {decode:.1f} tokens/s (batch 1, {args.max_new_tokens} tokens), prefill {prefill:.0f} tokens/s "
        f"(512 tokens), resident memory {resident / 2**20:.0f} MiB after loading, {torch.get_num_threads()} threads"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from compress.inspection import inspect_checkpoint

    rows, totals = inspect_checkpoint(Path(args.checkpoint), verify=not args.no_verify)
    if args.json:
        print(json.dumps({"layers": rows, "totals": totals}, indent=2))
        return 0
    header = ("layer", "format", "settings", "bits/weight", "rel. error")
    table = [header] + [
        (r["layer"], r["format"], r["settings"], f"{r['bits_per_weight']:.3f}",
         "-" if r["relative_error"] is None else f"{r['relative_error']:.3e}") for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths, strict=True)))
    print(
        f"\n{totals['layers']} compressed layers, {totals['weights']} weights, "
        f"{totals['bits_per_weight']:.3f} bits per weight, size {totals['checkpoint_bytes'] / 2**20:.1f} MiB (weight "
        f"files; {totals['directory_bytes'] / 2**20:.1f} MiB with the tokenizer, config and reports)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
