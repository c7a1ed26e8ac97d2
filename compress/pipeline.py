"""Run a recipe: load the model and data, evaluate the original, apply the stages in order, evaluate the
result, export it."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import __version__, runtime
from compress import data as textdata
from compress.blockwise import run_stage
from compress.errors import CompressError
from compress.eval import (
    ReferenceCache,
    decode_speed,
    directory_size,
    float16_weights_size,
    greedy_text,
    language_model_quality,
    prefill_speed,
    quantized_bits,
    sentence_embeddings,
    tokens_per_second,
    weights_size,
)
from compress.export import (
    atomic_directory,
    check_destination,
    checkpoint_config,
    round_to_storage,
    save_checkpoint,
    write_side_files,
)
from compress.formats.base import QuantizedLinear
from compress.generate import CACHE_KIND as GENERATED_CACHE
from compress.generate import cache_directory, generated_windows
from compress.hf import attach_quantizer
from compress.integrity import file_digests
from compress.memory import peak_rss_bytes, reset_peak_rss
from compress.memory_plan import plan_memory
from compress.models import (
    EMBEDDED,
    LoadedModel,
    count_parameters,
    embedded_path,
    find_blocks,
    load_model,
    resolve_model,
)
from compress.ownership import refuse_unowned
from compress.recipe import GENERATED, CalibrationSource, EvaluationData, Recipe, TextOrigin
from compress.registry import STAGES
from compress.report import Report, StageRecord, environment
from compress.run_state import KIND as RUN_STATE
from compress.run_state import RunState, fingerprint, run_directory
from compress.streaming import BlockStreamer, StreamedEvaluation, link_shards, load_outside, open_streamed
from compress.train_state import KIND as TRAINING_CHECKPOINT
from compress.train_state import training_directory
from compress.validate import calibrates, raise_problems, recipe_model, recipe_problems

log = logging.getLogger(__name__)

DECODE_TOKENS = 32  # greedy tokens timed at batch 1 after a 16-token prompt (the report's decode speed)


@dataclass
class Context:
    """What a stage may use besides the model: the recipe, tokenizer, calibration windows, the layer record."""

    recipe: Recipe
    tokenizer: Any
    kind: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # the running stage's own figures, kept in the report
    teacher: dict[str, Any] = field(default_factory=dict)  # what `prepare` hooks recorded from the original model
    offload: Path | None = None  # calibration activations go to files under it (compress/offload.py)
    texts: dict[str, str] = field(default_factory=dict)  # "calibration"/"evaluation" text given to compress.run
    generated: dict[int, torch.Tensor] = field(default_factory=dict)  # mixture index -> windows sampled from the
    generation_info: dict[int, dict[str, Any]] = field(default_factory=dict)  # original model, and how
    _token_cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def tokens(self, source: TextOrigin) -> torch.Tensor:
        key = (source.source, source.config, source.split, source.text_field)
        if key not in self._token_cache:
            text = textdata.load_text(
                source.source, config=source.config, split=source.split, text_field=source.text_field
            )
            self._token_cache[key] = textdata.tokenize(self.tokenizer, text)
        return self._token_cache[key]

    def source_ids(self, spec: CalibrationSource | EvaluationData, part: str) -> torch.Tensor:
        """The token ids of one source of `data.calibration` or of `data.evaluation`, its half selected."""
        if spec.source == textdata.IN_MEMORY:
            if part not in self.texts:
                raise CompressError(f"data.{part}.source {textdata.IN_MEMORY!r} is text given to compress.run in "
                                    "Python, and none was given")  # fmt: skip
            ids = textdata.tokenize(self.tokenizer, self.texts[part])
        else:
            ids = self.tokens(spec)
        return textdata.select_half(ids, spec.half)

    def calibration_counts(self) -> list[int]:
        spec = self.recipe.data.calibration
        return textdata.proportional_counts(spec.num_samples, [part.weight for part in spec.parts()])

    def sample_calibration(self, model: nn.Module, cache: Path | None) -> None:
        """Sample the generated sources of `data.calibration` from `model` (the original, before any stage), or
        take them from `cache` where an earlier run on the same model and settings left them."""
        spec = self.recipe.data.calibration
        for index, (part, count) in enumerate(zip(spec.parts(), self.calibration_counts(), strict=True)):
            if part.source == GENERATED and count and index not in self.generated:
                windows, info = generated_windows(model, self.tokenizer, count, spec.seq_len, part.generation,
                                                  self.recipe.seed + index, cache)  # fmt: skip
                self.generated[index] = windows
                self.generation_info[index] = info

    def calibration_summary(self) -> list[dict[str, Any]]:
        """Where the calibration windows come from, source by source, for the report."""
        spec = self.recipe.data.calibration
        summary = []
        for index, (part, count) in enumerate(zip(spec.parts(), self.calibration_counts(), strict=True)):
            entry = self.generation_info.get(index) or {"source": part.source, "half": part.half, "windows": count}
            summary.append({**entry, "seq_len": spec.seq_len} if count else {**entry, "windows": 0})
        return summary

    @cached_property
    def calibration_windows(self) -> torch.Tensor:
        """`data.calibration.num_samples` windows: from each source in proportion to its weight (the largest
        remainders rounded up), drawn at seeded offsets of its half, in a seeded order when there are several."""
        spec = self.recipe.data.calibration
        pieces = []
        for index, (part, count) in enumerate(zip(spec.parts(), self.calibration_counts(), strict=True)):
            if not count:
                continue
            if part.source == GENERATED:
                if index not in self.generated:
                    raise CompressError("generated calibration text is sampled from the original model before the "
                                        "first stage; nothing sampled it")  # fmt: skip
                pieces.append(self.generated[index])
                continue
            ids = self.source_ids(part, "calibration")
            pieces.append(textdata.random_windows(ids, count, spec.seq_len, self.recipe.seed + index))
        windows = torch.cat(pieces)
        if len(pieces) > 1:
            windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(self.recipe.seed))]
        return windows

    @cached_property
    def evaluation_windows(self) -> torch.Tensor:
        spec = self.recipe.data.evaluation
        return textdata.consecutive_windows(self.source_ids(spec, "evaluation"), spec.num_windows, spec.seq_len)

    def record_layer(self, name: str, module: QuantizedLinear, relative_error: float) -> None:
        self.layers[name] = {
            "format": module.format,
            "settings": module.settings(),
            "bits_per_weight": module.bits_per_weight(),
            "relative_error": relative_error,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunResult:
    model: nn.Module  # as exported: its logits are those of the checkpoint once loaded
    report: Report
    out: Path | None = None  # the checkpoint written (None on the processes of a launch that do not write)


def run(
    recipe: Recipe,
    *,
    force: bool = False,
    evaluate: bool = True,
    resume: bool = False,
    stream: bool = False,
    max_memory: int | None = None,
    offload: bool = False,
    loaded: LoadedModel | None = None,
    texts: dict[str, str] | None = None,
) -> RunResult:
    """Compress `recipe.model` with `recipe.stages`, evaluate before and after (unless `evaluate` is false),
    export to `recipe.export.out`. Finished stages and blocks are checkpointed beside the output; with `resume`, a
    run that was killed continues from them and ends with the same files as an uninterrupted run.

    With `stream`, the model is never loaded whole (compress/streaming.py). With `max_memory` (bytes), the run
    streams when the model would not fit, offloads the calibration activations to disk when they would not, and
    refuses at the start when even both need more. With `offload`, the calibration activations are kept in files
    beside the output instead of in memory (compress/offload.py).

    `loaded` is a model already in memory (compressed in place) with its tokenizer, instead of loading
    `recipe.model.name`; `texts` the calibration or evaluation text of a source `in-memory` (`compress.run`)."""
    if loaded is not None and (stream or max_memory is not None or resume):
        raise CompressError("a model given in memory cannot stream, plan its memory or resume; name it instead")
    if max_memory is not None:
        plan = plan_memory(recipe, max_memory, stream, offload)
        stream, offload = plan.stream, plan.offload
    if stream:
        return _run_streamed(recipe, force=force, evaluate=evaluate, resume=resume, offload=offload)
    started = time.perf_counter()
    if loaded is None:
        recipe_model(recipe)  # a missing model fails before anything else, naming the recipe that writes it
    out = check_output(recipe, force)
    seed_everything(recipe.seed)
    if loaded is None:
        loaded = load_model(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    model = loaded.model
    context = Context(recipe=recipe, tokenizer=loaded.tokenizer, kind=loaded.kind, texts=dict(texts or {}))
    raise_problems(recipe, recipe_problems(recipe, model)[0])
    report = Report(recipe=recipe.path, overrides=recipe.overrides, environment=environment())
    report.model = {
        "source": recipe.model.name,
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),
    }
    report.size["original_bytes"] = float16_weights_size(model)
    # Under `accelerate launch` every process runs the recipe (training stages split their batches between them);
    # only the main process evaluates and writes.
    main_process = _is_main_process()
    state = RunState(run_directory(out), run_fingerprint(recipe), resume=resume, writer=main_process)
    context.offload = state.scratch("activations") if offload else None
    if calibrates(recipe):
        context.sample_calibration(_original(recipe, model), cache_directory(out))  # before any stage changes it
    evaluation = _Evaluation(model, loaded.kind, context) if evaluate and main_process else None
    if evaluation is not None:
        report.before = evaluation.measure(model, original=True)

    prepared: dict[int, float] = {}  # seconds each stage's `prepare` took, counted in its time
    for index, stage in enumerate(recipe.stages):
        prepare = STAGES[stage.name].prepare
        if prepare is not None:
            prepare_start = time.perf_counter()
            prepare(model, stage.config, context)
            prepared[index] = time.perf_counter() - prepare_start
    restore_finished_stages(model, recipe, state, context)
    report.stages = [StageRecord(**record) for record in state.stage_records]
    peak_before_stages = peak_rss_bytes()  # each stage resets the high-water mark; keep what came before
    for index, stage in enumerate(recipe.stages):
        if index < state.stages_done:
            continue
        log.info("stage %s", stage.name)
        reset_peak_rss()
        stage_start = time.perf_counter()
        context.metrics = {}
        entry = STAGES[stage.name]
        if entry.block is not None:
            run_stage(model, entry, stage.config, context, stage_index=index, state=state)
            if entry.finish is not None and entry.finish(model, stage.config, context):
                state.save_model(index, model, context)  # it changed the model outside the blocks too
        else:
            entry.apply(model, stage.config, context)
            state.save_model(index, model, context)
        seconds = time.perf_counter() - stage_start + prepared.get(index, 0.0)
        record = StageRecord(stage.name, seconds, peak_rss_bytes(), context.metrics)
        report.stages.append(record)
        state.finish_stage(asdict(record))

    round_to_storage(model)
    runtime.prepare(model)  # the compressed layers compute from their codes, as the loaded checkpoint will
    attach_quantizer(model)  # save_pretrained of the result writes the packed format
    if evaluation is not None:
        report.after = evaluation.measure(model, original=False)
        report.samples = evaluation.samples
        evaluation.close()
    report.after["bits_per_weight"], report.after["quantized_weights"] = quantized_bits(model)
    report.after["parameters"] = count_parameters(model)  # fewer after pruning
    report.layers = context.layers
    if calibrates(recipe):
        report.calibration = context.calibration_summary()

    if not main_process:
        return RunResult(model, report)
    with atomic_directory(out) as directory:
        save_checkpoint(
            model, loaded.tokenizer, directory, export_format=recipe.export.format, recipe_yaml=recipe.to_yaml()
        )
        write_reports(directory, report, started, peak_before_stages)
        check_budget(recipe, report)
    state.discard()
    return RunResult(model, report, out)


def check_budget(recipe: Recipe, report: Report) -> None:
    """A checkpoint over the recipe's budget is not written (the allocation plans within it; this is the proof)."""
    budget = recipe.budget
    if budget is None:
        return
    if budget.size is not None and report.size["checkpoint_bytes"] > budget.bytes():
        raise CompressError(f"the checkpoint's weight files take {report.size['checkpoint_bytes']} bytes, over the "
                            f"budget of {budget.bytes()} ({budget.size}); nothing was written")  # fmt: skip
    if budget.bits_per_weight is not None and report.after["bits_per_weight"] > budget.bits_per_weight + 1e-9:
        raise CompressError(f"the quantized layers store {report.after['bits_per_weight']:.4f} bits per weight, over "
                            f"the budget of {budget.bits_per_weight}; nothing was written")  # fmt: skip


def _run_streamed(recipe: Recipe, *, force: bool, evaluate: bool, resume: bool, offload: bool = False) -> RunResult:
    """`run` for a model that is never held whole: block-local stages only, blocks read from the safetensors
    shards one at a time, the checkpoint written as one shard per block."""
    started = time.perf_counter()
    out = check_output(recipe, force)
    problems = streaming_problems(recipe)
    if problems:
        raise CompressError(f"recipe {recipe.path} cannot stream:\n  " + "\n  ".join(problems))
    seed_everything(recipe.seed)
    source = recipe_model(recipe)
    model, tokenizer, kind, weights = open_streamed(source, trust_remote_code=recipe.model.trust_remote_code)
    context = Context(recipe=recipe, tokenizer=tokenizer, kind=kind)
    raise_problems(recipe, recipe_problems(recipe, model)[0])
    report = Report(recipe=recipe.path, overrides=recipe.overrides, environment=environment())
    report.model = {"source": recipe.model.name, "architecture": type(model).__name__,
                    "parameters": count_parameters(model), "streamed": True}  # fmt: skip
    report.size["original_bytes"] = float16_weights_size(model)
    state = RunState(run_directory(out), run_fingerprint(recipe, "streamed"), resume=resume)
    context.offload = state.scratch("activations") if offload else None
    evaluation = _Evaluation(model, kind, context, speed=False) if evaluate else None
    streams = None
    if evaluation is not None:
        spec = recipe.data.evaluation
        streams = StreamedEvaluation(model, weights, context.evaluation_windows, spec.batch_size)
    streamer = BlockStreamer(model, weights, streams)
    report.stages = [StageRecord(**record) for record in state.stage_records]
    peak_before_stages = peak_rss_bytes()
    for index, stage in enumerate(recipe.stages):
        if index < state.stages_done:
            _, blocks = find_blocks(model)
            for block in range(len(blocks)):
                state.restore_block(model, index, block, context, tensors=False)
            continue
        reset_peak_rss()
        stage_start = time.perf_counter()
        context.metrics = {}
        run_stage(model, STAGES[stage.name], stage.config, context, stage_index=index, state=state, streamer=streamer)
        record = StageRecord(stage.name, time.perf_counter() - stage_start, peak_rss_bytes(), context.metrics)
        report.stages.append(record)
        state.finish_stage(asdict(record))
    load_outside(model, weights)  # the embeddings and head, as the source stores them
    if evaluation is not None:
        with streams.replay(model, "original"):
            report.before = evaluation.measure(model, original=True)
    round_to_storage(model)  # the tensors outside the blocks, as the export stores them
    if evaluation is not None:
        with streams.replay(model, "compressed"):
            report.after = evaluation.measure(model, original=False)
        evaluation.close()
    report.after["bits_per_weight"], report.after["quantized_weights"] = quantized_bits(model)
    report.after["parameters"] = count_parameters(model)
    report.layers = context.layers
    if calibrates(recipe):
        report.calibration = context.calibration_summary()
    _, blocks = find_blocks(model)
    with atomic_directory(out) as directory:
        config, metadata = checkpoint_config(model, packed=True)
        files = [state.block_file(len(recipe.stages) - 1, index) for index in range(len(blocks))]
        link_shards(model, files, directory, metadata)
        write_side_files(model, config, tokenizer, directory, recipe.to_yaml())
        write_reports(directory, report, started, peak_before_stages)
    state.discard()
    return RunResult(model, report, out)


def _original(recipe: Recipe, model: nn.Module) -> nn.Module:
    """The model generated calibration text is sampled from: the teacher a stage names (a recipe that fine-tunes a
    compressed checkpoint distils from it), else the recipe's model as loaded."""
    teachers = [s.config.teacher for s in recipe.stages if getattr(s.config, "teacher", None) is not None]
    if not teachers or all(part.source != GENERATED for part in recipe.data.calibration.parts()):
        return model
    return load_model(teachers[0], trust_remote_code=recipe.model.trust_remote_code).model


def write_reports(directory: Path, report: Report, started: float, peak_before_stages: int) -> None:
    """Size, time and peak memory into `report`, then report.md and report.json (with every file's digest)."""
    report.size["checkpoint_bytes"] = weights_size(directory)  # the one size every report and command gives
    chart = report.error_chart()
    if chart is not None:
        (directory / "report.svg").write_text(chart)
    chart = report.allocation_chart()
    if chart is not None:
        (directory / "allocation.svg").write_text(chart)
    report.size["directory_bytes"] = directory_size(directory)  # with the tokenizer, config and reports
    peak = max([peak_before_stages, peak_rss_bytes(), *(s.peak_rss_bytes for s in report.stages)])
    report.total = {"seconds": time.perf_counter() - started, "peak_rss_bytes": peak}
    (directory / "report.md").write_text(report.to_markdown())
    report.files = file_digests(directory)
    (directory / "report.json").write_text(report.to_json())


def streaming_problems(recipe: Recipe) -> list[str]:
    """Why `recipe` cannot run streamed: streaming runs one block-local stage and exports the packed format."""
    problems = []
    if len(recipe.stages) != 1:
        problems.append(recipe.problem(("stages",), f"streaming runs one stage; the recipe has {len(recipe.stages)}"))
    for index, stage in enumerate(recipe.stages):
        if STAGES[stage.name].block is None:
            message = f"{stage.name} works on the whole model and cannot stream; rtn, nupes and jlcm can"
            problems.append(recipe.problem(("stages", index, "stage"), message))
        elif STAGES[stage.name].whole_model is not None:
            reason = STAGES[stage.name].whole_model(stage.config)
            if reason:
                problems.append(recipe.problem(("stages", index), reason))
    if recipe.export.format != "packed":
        problems.append(recipe.problem(("export", "format"), "streaming writes the packed format"))
    for index, stage in enumerate(recipe.stages):
        if stage.name == "allocate":
            message = "allocate measures each layer with gradients through the whole model, which streaming never holds"
            problems.append(recipe.problem(("stages", index, "stage"), message))
    if any(part.source == GENERATED for part in recipe.data.calibration.parts()):
        message = ("generated calibration text is sampled from the whole model, which streaming never holds; "
                   "calibrate on a text file or dataset, or run without streaming")  # fmt: skip
        problems.append(recipe.problem(("data", "calibration", "source"), message, GENERATED))
    try:
        gguf = resolve_model(recipe.model.name).gguf_file
    except CompressError:
        gguf = None  # the run itself names what is wrong with the model
    if gguf is not None:
        problems.append(recipe.problem(("model",), "a GGUF file cannot stream (streaming reads safetensors shards)"))
    return problems


def check_output(recipe: Recipe, force: bool) -> Path:
    """The output directory, after refusing (before any heavy work) one that is an input or the user's, and any
    run-state or training directory of its name that compress did not make."""
    out = check_destination(recipe.export.out, force, input_paths(recipe))
    refuse_unowned(run_directory(out), RUN_STATE)
    refuse_unowned(cache_directory(out), GENERATED_CACHE)
    for stage in dict.fromkeys(stage.name for stage in recipe.stages):
        refuse_unowned(training_directory(out, stage), TRAINING_CHECKPOINT)
    return out


def input_paths(recipe: Recipe) -> tuple[Path, ...]:
    """The local files and directories the run reads: the model and the text sources (an output must be none)."""
    names = [recipe.model.name, *(p.source for p in recipe.data.calibration.parts()), recipe.data.evaluation.source]
    paths = [Path(name) for name in names if Path(name).exists()]
    if recipe.model.name in EMBEDDED:
        try:
            paths.append(embedded_path(recipe.model.name))
        except CompressError:
            pass  # not installed: loading the model names the package
    return tuple(paths)


def run_fingerprint(recipe: Recipe, *extra: str) -> str:
    """What a resumed run must share with the run that left the state: the resolved recipe and this version."""
    return fingerprint(recipe.to_yaml(), __version__, *extra)


def restore_finished_stages(model: nn.Module, recipe: Recipe, state: RunState, context: Context) -> None:
    """Bring `model` to where the earlier run's finished stages left it: the last whole-model checkpoint, then the
    blocks of every block-local stage after it (the stage under way restores its own finished blocks)."""
    done = state.stages_done
    whole = [i for i in range(done) if state.has_model(i)]
    first = 0
    if whole:
        state.restore_model(whole[-1], model, context)
        first = whole[-1] + 1
    _, blocks = find_blocks(model)
    for index in range(first, done):
        for block in range(len(blocks)):
            state.restore_block(model, index, block, context)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


class _Evaluation:
    """Measures the original model, keeps what the comparison needs, then measures the compressed one."""

    def __init__(self, model: nn.Module, kind: str, context: Context, speed: bool = True) -> None:
        self.kind = kind
        self.speed = speed  # a streamed model cannot be timed as a whole
        self.spec = context.recipe.data.evaluation
        self.windows = context.evaluation_windows
        self.reference: ReferenceCache | None = None
        self.embeddings: torch.Tensor | None = None
        self.tokenizer = context.tokenizer
        self.samples: dict[str, str] = {}  # the prompt and each model's greedy continuation
        if self.kind == "causal-lm":
            vocab = model.get_output_embeddings().out_features
            self.reference = ReferenceCache(len(self.windows), self.windows.shape[1] - 1, vocab)

    def measure(self, model: nn.Module, original: bool) -> dict[str, Any]:
        result: dict[str, Any] = {"windows": len(self.windows), "seq_len": self.spec.seq_len}
        if self.kind == "causal-lm":
            quality = language_model_quality(
                model,
                self.windows,
                self.spec.batch_size,
                self.reference,
                record=original,
                desc="eval original" if original else "eval compressed",
            )
            result["perplexity"] = quality.perplexity
            result["log_perplexity_se"] = quality.log_perplexity_se
            result["tokens"] = quality.tokens
            if not original:
                result["kl_to_original"] = quality.kl_to_original
        else:
            embeddings = sentence_embeddings(model, self.windows, self.spec.batch_size)
            if original:
                self.embeddings = embeddings
                result["embedding_cosine"] = 1.0
            else:
                result["embedding_cosine"] = float((embeddings * self.embeddings).sum(-1).mean())
        if self.speed and self.kind == "causal-lm" and self.spec.sample_tokens:
            self.samples["prompt"] = self.spec.prompt
            self.samples["original" if original else "compressed"] = greedy_text(
                model, self.tokenizer, self.spec.prompt, self.spec.sample_tokens
            )
        if self.speed and self.kind == "causal-lm":
            window = self.windows[:1]
            result["decode_tokens_per_second"] = decode_speed(model, window[:, :16], DECODE_TOKENS)[0]
            result["prefill_tokens_per_second"] = prefill_speed(model, window)
        elif self.speed:
            result["tokens_per_second"] = tokens_per_second(model, self.windows, self.spec.batch_size)
        return result

    def close(self) -> None:
        if self.reference is not None:
            self.reference.close()
