"""The Python API: `compress.run(recipe, model=..., calibration=..., out=...)`, what `compress run` is built on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from torch import nn

from compress.data import IN_MEMORY
from compress.errors import CompressError
from compress.pipeline import RunResult
from compress.recipe import Recipe, Stage, load_recipe, parse_recipe
from compress.registry import STAGES

RecipeLike = str | Path | Mapping | Recipe | list
TextsLike = str | Iterable[str] | Any  # a source name, texts, or a datasets.Dataset with a text field


def run(
    recipe: RecipeLike,
    *,
    model: str | Path | nn.Module | None = None,
    tokenizer: Any = None,
    calibration: TextsLike | None = None,
    evaluation: TextsLike | None = None,
    out: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    evaluate: bool = True,
    resume: bool = False,
    stream: bool = False,
    max_memory: int | None = None,
    offload: bool = False,
) -> RunResult:
    """Compress a model with a recipe, evaluate it and export it; returns the compressed model and its report.

    `recipe`: a YAML file, a mapping as the file would hold, a `Recipe`, or a list of stages (mappings such as
    `{"stage": "nupes", "bits": 4}`, or stage option objects such as `compress.stages.nupes.NupesConfig(bits=4)`).
    `model`: a name (hub id, directory, `.gguf` file, alias) or a transformers model already in memory, which is
    compressed in place (then `tokenizer` is required). `calibration`, `evaluation`: a source name as in a recipe,
    a list of texts, or a `datasets.Dataset` with a `text` column; texts are used whole (`half: all`).
    `out`: the checkpoint directory (else the recipe's `export.out`). `overrides`: dotted recipe fields, as
    `--set` (`{"stages.0.bits": 3}`). The other options are those of `compress run`.

    The returned model computes as the written checkpoint does once loaded, and `save_pretrained` writes it."""
    from compress.models import LoadedModel, check_weights_finite, kind_of

    changes: dict[str, Any] = dict(overrides or {})
    loaded = None
    if isinstance(model, (str, Path)):
        changes["model.name"] = str(model)
    elif model is not None:
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise CompressError(f"compress.run: model must be a name or a transformers model, got {type(model)}")
        if tokenizer is None:
            raise CompressError("compress.run: a model given in memory needs its tokenizer (tokenizer=...)")
        model.float().eval()  # the stages compute in float32
        check_weights_finite(model, "the model given to compress.run")
        name = str(getattr(model.config, "_name_or_path", "") or IN_MEMORY)
        changes["model.name"] = name
        loaded = LoadedModel(model, tokenizer, kind_of(model.config), name)
    elif tokenizer is not None:
        raise CompressError("compress.run: tokenizer= is for a model given in memory; none was given")
    texts: dict[str, str] = {}
    for part, given in (("calibration", calibration), ("evaluation", evaluation)):
        if given is None:
            continue
        if part == "calibration":
            changes["data.calibration.sources"] = []  # one source given here replaces a recipe's mixture
        if isinstance(given, (str, Path)):
            changes[f"data.{part}.source"] = str(given)
            continue
        texts[part] = _joined(given, part)
        changes[f"data.{part}.source"] = IN_MEMORY
        changes[f"data.{part}.half"] = "all"
    if out is not None:
        changes["export.out"] = str(out)
    parsed = as_recipe(recipe, changes)
    from compress import pipeline

    return pipeline.run(parsed, force=force, evaluate=evaluate, resume=resume, stream=stream, max_memory=max_memory,
                        offload=offload, loaded=loaded, texts=texts)  # fmt: skip


def as_recipe(recipe: RecipeLike, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """A validated `Recipe` from any form `run` takes, with `overrides` applied."""
    overrides = dict(overrides or {})
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    if isinstance(recipe, Recipe):
        return parse_recipe(yaml.safe_dump(recipe.to_dict(), sort_keys=False), recipe.path, overrides)
    if isinstance(recipe, list):
        recipe = {"stages": recipe}
    if not isinstance(recipe, Mapping):
        raise CompressError(f"compress.run: recipe must be a file, a mapping or a list of stages, got {type(recipe)}")
    raw = dict(recipe)
    if isinstance(raw.get("stages"), list):
        raw["stages"] = [_stage_mapping(stage, index) for index, stage in enumerate(raw["stages"])]
    return parse_recipe(yaml.safe_dump(raw, sort_keys=False), "<recipe given to compress.run>", overrides)


def _stage_mapping(stage: Any, index: int) -> Any:
    """A stage as the recipe file writes it: a mapping stays, a `Stage` or a stage's option object is written out."""
    if isinstance(stage, Stage):
        return {"stage": stage.name, **stage.config.model_dump()}
    if isinstance(stage, BaseModel):
        names = [name for name, entry in STAGES.items() if type(stage) is entry.config]
        if len(names) != 1:
            raise CompressError(f"compress.run: stages[{index}] is a {type(stage).__name__}, which is the options "
                                "of no single stage; write it as {'stage': NAME, ...}")  # fmt: skip
        return {"stage": names[0], **stage.model_dump(exclude_unset=True)}
    return dict(stage) if isinstance(stage, Mapping) else stage


def _joined(given: Any, part: str) -> str:
    """Texts as one text, blank lines between them: a list of strings, or a dataset's `text` column."""
    column = getattr(given, "column_names", None)
    if column is not None:
        if "text" not in column:
            raise CompressError(f"compress.run: the {part} dataset has no `text` column; its columns are {column}")
        given = given["text"]
    try:
        texts = list(given)
    except TypeError as error:
        raise CompressError(f"compress.run: {part} must be a source name, texts or a dataset, got "
                            f"{type(given).__name__}") from error  # fmt: skip
    if not texts or not all(isinstance(text, str) for text in texts):
        raise CompressError(f"compress.run: {part} must hold at least one text, and only strings")
    return "\n\n".join(texts)
