"""Run a recipe: load the model and data, evaluate the original, apply the stages in order, evaluate the
result, export it."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from compress import data as textdata
from compress.eval import (
    ReferenceCache,
    directory_size,
    language_model_quality,
    quantized_bits,
    sentence_embeddings,
    tokens_per_second,
)
from compress.export import atomic_directory, check_destination, round_to_storage, save_checkpoint
from compress.formats.base import QuantizedLinear
from compress.integrity import file_digests
from compress.memory import peak_rss_bytes, reset_peak_rss
from compress.models import LoadedModel, count_parameters, load_model
from compress.recipe import Recipe, TextSource
from compress.registry import STAGES
from compress.report import Report, StageRecord, environment
from compress.validate import raise_problems, recipe_problems

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a stage may use besides the model: the recipe, tokenizer, calibration windows, the layer record."""

    recipe: Recipe
    tokenizer: Any
    kind: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # the running stage's own figures, kept in the report
    teacher: dict[str, Any] = field(default_factory=dict)  # what `prepare` hooks recorded from the original model
    _token_cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def tokens(self, source: TextSource) -> torch.Tensor:
        key = (source.source, source.config, source.split, source.text_field)
        if key not in self._token_cache:
            text = textdata.load_text(
                source.source, config=source.config, split=source.split, text_field=source.text_field
            )
            self._token_cache[key] = textdata.tokenize(self.tokenizer, text)
        return self._token_cache[key]

    @cached_property
    def calibration_windows(self) -> torch.Tensor:
        spec = self.recipe.data.calibration
        ids = textdata.select_half(self.tokens(spec), spec.half)
        return textdata.random_windows(ids, spec.num_samples, spec.seq_len, self.recipe.seed)

    @cached_property
    def evaluation_windows(self) -> torch.Tensor:
        spec = self.recipe.data.evaluation
        ids = textdata.select_half(self.tokens(spec), spec.half)
        return textdata.consecutive_windows(ids, spec.num_windows, spec.seq_len)

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


def run(recipe: Recipe, *, force: bool = False, evaluate: bool = True) -> RunResult:
    """Compress `recipe.model` with `recipe.stages`, evaluate before and after (unless `evaluate` is false),
    export to `recipe.export.out`."""
    started = time.perf_counter()
    out = check_destination(recipe.export.out, force)
    seed_everything(recipe.seed)
    loaded = load_model(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    model = loaded.model
    context = Context(recipe=recipe, tokenizer=loaded.tokenizer, kind=loaded.kind)
    raise_problems(recipe, recipe_problems(recipe, model)[0])
    report = Report(recipe=recipe.path, environment=environment())
    report.model = {
        "source": recipe.model.name,
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),
    }
    report.size["dense_fp16_bytes"] = 2 * count_parameters(model)
    # Under `accelerate launch` every process runs the recipe (training stages split their batches between them);
    # only the main process evaluates and writes.
    main_process = _is_main_process()
    evaluation = _Evaluation(model, loaded, context) if evaluate and main_process else None
    if evaluation is not None:
        report.before = evaluation.measure(model, original=True)

    for stage in recipe.stages:
        prepare = STAGES[stage.name].prepare
        if prepare is not None:
            prepare(model, stage.config, context)
    peak_before_stages = peak_rss_bytes()  # each stage resets the high-water mark; keep what came before
    for stage in recipe.stages:
        log.info("stage %s", stage.name)
        reset_peak_rss()
        stage_start = time.perf_counter()
        context.metrics = {}
        STAGES[stage.name].apply(model, stage.config, context)
        seconds = time.perf_counter() - stage_start
        report.stages.append(StageRecord(stage.name, seconds, peak_rss_bytes(), context.metrics))

    round_to_storage(model)
    if evaluation is not None:
        report.after = evaluation.measure(model, original=False)
        evaluation.close()
    report.after["bits_per_weight"], report.after["quantized_weights"] = quantized_bits(model)
    report.after["parameters"] = count_parameters(model)  # fewer after pruning
    report.layers = context.layers

    if not main_process:
        return RunResult(model, report)
    with atomic_directory(out) as directory:
        save_checkpoint(
            model, loaded.tokenizer, directory, export_format=recipe.export.format, recipe_yaml=recipe.to_yaml()
        )
        report.size["checkpoint_bytes"] = directory_size(directory)
        peak = max([peak_before_stages, peak_rss_bytes(), *(s.peak_rss_bytes for s in report.stages)])
        report.total = {"seconds": time.perf_counter() - started, "peak_rss_bytes": peak}
        (directory / "report.md").write_text(report.to_markdown())
        report.files = file_digests(directory)
        (directory / "report.json").write_text(report.to_json())
    return RunResult(model, report)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


class _Evaluation:
    """Measures the original model, keeps what the comparison needs, then measures the compressed one."""

    def __init__(self, model: nn.Module, loaded: LoadedModel, context: Context) -> None:
        self.kind = loaded.kind
        self.spec = context.recipe.data.evaluation
        self.windows = context.evaluation_windows
        self.reference: ReferenceCache | None = None
        self.embeddings: torch.Tensor | None = None
        if self.kind == "causal-lm":
            vocab = model.get_output_embeddings().weight.shape[0]
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
        result["tokens_per_second"] = tokens_per_second(model, self.windows, self.spec.batch_size)
        return result

    def close(self) -> None:
        if self.reference is not None:
            self.reference.close()
