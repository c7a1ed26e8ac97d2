"""Checks of a recipe against the model it will compress, made before any heavy work: stage order, layer
selection, group sizes against the layers' shapes, sequence lengths, data files. Every problem is listed at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress.data import IN_MEMORY, local_source_problem
from compress.errors import CompressError
from compress.formats.base import QuantizedLinear
from compress.hf import install_from_config
from compress.models import ModelSource, load_config, resolve_model, skeleton
from compress.recipe import GENERATED, Recipe
from compress.registry import STAGES
from compress.stages.base import LayerSelection, selected_layers


@dataclass
class Validation:
    architecture: str
    kind: str
    layers_per_stage: list[int | None]  # None: the stage does not select layers


def recipe_problems(recipe: Recipe, model: nn.Module) -> tuple[list[str], list[int | None]]:
    """Problems of `recipe` for `model` (real or a meta skeleton), and how many layers each stage selects."""
    problems: list[str] = []
    counts: list[int | None] = []
    quantized_by: dict[str, int] = {}
    already_quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())  # a compressed checkpoint
    for index, stage in enumerate(recipe.stages):
        entry = STAGES[stage.name]
        loc = ("stages", index)
        if entry.needs_quantized and not (quantized_by or already_quantized):
            quantizers = ", ".join(sorted(n for n, e in STAGES.items() if e.quantizes))
            message = f"{stage.name} works on compressed layers; put a quantizing stage ({quantizers}) before it"
            problems.append(recipe.problem((*loc, "stage"), message))
        layers = selected_layers(model, stage.config) if isinstance(stage.config, LayerSelection) else {}
        counts.append(len(layers) if isinstance(stage.config, LayerSelection) else None)
        if isinstance(stage.config, LayerSelection) and not layers:
            problems.append(
                recipe.problem((*loc, "targets"), "selects no layer of the model (check targets and ignore)")
            )
        if entry.quantizes:
            again = [name for name in layers if name in quantized_by]
            if again:
                earlier = quantized_by[again[0]]
                message = (
                    f"{stage.name} would quantize {len(again)} layers (first {again[0]}) that stages[{earlier}] "
                    f"({recipe.stages[earlier].name}) already quantized; use ignore to split the layers between them"
                )
                problems.append(recipe.problem(loc, message))
            quantized_by.update(dict.fromkeys((n for n in layers if n not in quantized_by), index))
        if entry.check is not None:
            problems += [recipe.problem((*loc, field), message) for field, message in entry.check(stage.config, layers)]
    limit = getattr(model.config, "max_position_embeddings", None)
    for part in ("calibration", "evaluation"):
        spec = getattr(recipe.data, part)
        if limit is not None and spec.seq_len > limit:
            message = f"exceeds the model's max_position_embeddings {limit}"
            problems.append(recipe.problem(("data", part, "seq_len"), message, spec.seq_len))
    evaluation = recipe.data.evaluation
    problem = local_source_problem(evaluation.source)
    if problem:
        problems.append(recipe.problem(("data", "evaluation", "source"), problem, evaluation.source))
    problems += calibration_problems(recipe, model)
    problems += budget_problems(recipe, model)
    return problems, counts


def budget_problems(recipe: Recipe, model: nn.Module) -> list[str]:
    """A budget needs an `allocate` stage, first (it measures the original model), and a reachable budget."""
    from compress.stages import allocate

    allocating = [index for index, stage in enumerate(recipe.stages) if stage.name == "allocate"]
    if recipe.budget is not None and not allocating:
        return [recipe.problem(("budget",), "is met by an allocate stage, and the recipe has none")]
    problems = []
    for index in allocating:
        if index != 0:
            message = "allocate measures each layer of the original model: it must be the first stage"
            problems.append(recipe.problem(("stages", index, "stage"), message))
        config = recipe.stages[index].config
        layers = selected_layers(model, config)
        if not layers:
            continue
        where = ("budget",) if recipe.budget is not None else ("stages", index)
        problems += [recipe.problem(where, p) for p in allocate.budget_problems(model, config, recipe.budget, layers)]
    return problems


def calibrates(recipe: Recipe) -> bool:
    """Whether a stage of `recipe` reads calibration windows: a block-local stage that asks for calibration
    inputs, or a stage that trains the whole model (pv_tuning, hesso)."""
    return any(STAGES[s.name].block is None or STAGES[s.name].prepare is not None
               or STAGES[s.name].calibration_batch(s.config) is not None for s in recipe.stages)  # fmt: skip


def calibration_problems(recipe: Recipe, model: nn.Module) -> list[str]:
    """Each calibration source: a file that is there, a model that can generate for `generated`, and never the
    evaluation text (the same source, config, split and field, with halves that overlap). A missing file is
    named by every recipe; the rest only where a stage calibrates."""
    problems = []
    calibration, evaluation = recipe.data.calibration, recipe.data.evaluation
    for index, part in enumerate(calibration.parts()):
        loc = ("data", "calibration", "sources", index) if calibration.sources else ("data", "calibration")
        problem = local_source_problem(part.source)
        if problem:
            problems.append(recipe.problem((*loc, "source"), problem, part.source))
        if not calibrates(recipe):
            continue
        if part.source == GENERATED:
            if not getattr(model, "can_generate", lambda: False)():
                message = f"generated text is sampled from the model, and {type(model).__name__} does not generate"
                problems.append(recipe.problem((*loc, "source"), message, part.source))
            continue
        same_text = part.origin() == (evaluation.source, evaluation.config, evaluation.split, evaluation.text_field)
        overlap = "all" in (part.half, evaluation.half) or part.half == evaluation.half
        if same_text and overlap and part.source != IN_MEMORY:  # text given in Python is two texts, not halves
            message = (f"the calibration windows would overlap the evaluation windows: both read {part.source!r}, "
                       f"half {part.half!r} against data.evaluation.half {evaluation.half!r}; calibrate on the "
                       "other half or on other text, so the evaluation measures text the stages never saw")  # fmt: skip
            problems.append(recipe.problem((*loc, "half"), message, part.half))
    return problems


def raise_problems(recipe: Recipe, problems: list[str]) -> None:
    if problems:
        raise CompressError(f"recipe {recipe.path} does not fit the model:\n  " + "\n  ".join(problems))


def recipe_model(recipe: Recipe) -> ModelSource:
    """Where the recipe's model is; a missing local directory that another recipe beside this one writes is
    named with that recipe, to run first (`recipes/pv-tune.yaml` reads what `recipes/nupes-w2.yaml` writes)."""
    try:
        return resolve_model(recipe.model.name)
    except CompressError as error:
        writers = writers_of(recipe.model.name, Path(recipe.path).parent) if Path(recipe.path).is_file() else []
        if not writers:
            raise
        raise CompressError(f"{error}; it is the output of {writers[0]}: run `compress run {writers[0]}` "
                            "first") from error  # fmt: skip


def writers_of(out: str, directory: Path) -> list[str]:
    """The recipe files in `directory` whose `export.out` is `out`."""
    import yaml

    found = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        export = raw.get("export") if isinstance(raw, dict) else None
        if isinstance(export, dict) and isinstance(export.get("out"), str) and Path(export["out"]) == Path(out):
            found.append(str(path))
    return found


def validate(recipe: Recipe) -> Validation:
    """Check `recipe` against its model's config alone (no weights are read); raise with every problem."""
    source = recipe_model(recipe)
    config, kind = load_config(source, trust_remote_code=recipe.model.trust_remote_code)
    model = skeleton(config, kind, trust_remote_code=recipe.model.trust_remote_code)
    install_from_config(model, config, f"model {recipe.model.name!r}")  # a compress checkpoint: its layers
    problems, counts = recipe_problems(recipe, model)
    raise_problems(recipe, problems)
    return Validation(type(model).__name__, kind, counts)
