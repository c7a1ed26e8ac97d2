"""YAML recipe -> validated objects. Unknown fields are refused; every error names the file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compress.errors import CompressError
from compress.registry import STAGES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    name: str = "smollm2-135m"
    trust_remote_code: bool = False


class TextSource(Strict):
    source: str = "embedded"
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    seq_len: int = Field(512, ge=8, le=131072)


class CalibrationData(TextSource):
    half: Literal["first", "second", "all"] = "first"
    num_samples: int = Field(128, ge=1)


class EvaluationData(TextSource):
    half: Literal["first", "second", "all"] = "second"
    num_windows: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)


class DataSpec(Strict):
    calibration: CalibrationData = CalibrationData()
    evaluation: EvaluationData = EvaluationData()


class ExportSpec(Strict):
    format: Literal["packed", "dense"] = "packed"
    out: str = "out/default"


class RecipeFields(Strict):
    model: ModelSpec = ModelSpec()
    seed: int = 0
    data: DataSpec = DataSpec()
    stages: list[dict[str, Any]] = Field(min_length=1)
    export: ExportSpec = ExportSpec()


class Stage(BaseModel):
    """One step of the recipe: the registered stage `name` with its validated `config`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    config: BaseModel


class Recipe(BaseModel):
    model: ModelSpec
    seed: int
    data: DataSpec
    stages: list[Stage]
    export: ExportSpec
    path: str = "<recipe>"

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in), loadable again with `parse_recipe`."""
        return {
            "model": self.model.model_dump(),
            "seed": self.seed,
            "data": self.data.model_dump(),
            "stages": [{"stage": s.name, **s.config.model_dump()} for s in self.stages],
            "export": self.export.model_dump(),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file; `overrides` maps dotted paths (`stages.0.bits`) to values."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"recipe {str(path)!r}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CompressError(f"recipe {str(path)!r} could not be read: {error}") from error
    return parse_recipe(text, str(path), overrides)


def parse_recipe(text: str, source: str = "<recipe>", overrides: dict[str, Any] | None = None) -> Recipe:
    try:
        raw = yaml.safe_load(text)
        lines = _line_map(yaml.compose(text)) if raw is not None else {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise CompressError(f"recipe {source}{where}: not valid YAML ({problem})") from error
    if not isinstance(raw, dict):
        raise CompressError(f"recipe {source}: the top level must be a mapping with a `stages` list")
    if isinstance(raw.get("model"), str):
        raw["model"] = {"name": raw["model"]}  # `model: NAME` is short for `model: {name: NAME}`
    for dotted, value in (overrides or {}).items():
        _set_path(raw, dotted, value, source)

    problems: list[str] = []
    try:
        fields = RecipeFields.model_validate(raw)
    except ValidationError as error:
        problems += [_describe(e["loc"], e["msg"], e.get("input"), lines, source) for e in error.errors()]
        fields = None
    stages: list[Stage] = []
    for index, entry in enumerate(raw.get("stages") or [] if isinstance(raw.get("stages"), list) else []):
        stage, stage_problems = _validate_stage(index, entry, lines, source)
        problems += stage_problems
        if stage is not None:
            stages.append(stage)
    if problems:
        raise CompressError("recipe has errors:\n  " + "\n  ".join(dict.fromkeys(problems)))
    assert fields is not None
    return Recipe(
        model=fields.model, seed=fields.seed, data=fields.data, stages=stages, export=fields.export, path=source
    )


def _validate_stage(index: int, entry: Any, lines: dict, source: str) -> tuple[Stage | None, list[str]]:
    where = ("stages", index)
    if not isinstance(entry, dict) or "stage" not in entry:
        return None, [_describe(where, "each stage is a mapping with a `stage: NAME` key", entry, lines, source)]
    name = entry["stage"]
    if name not in STAGES:
        message = f"unknown stage; valid stages are {', '.join(sorted(STAGES))}"
        return None, [_describe((*where, "stage"), message, name, lines, source)]
    settings = {k: v for k, v in entry.items() if k != "stage"}
    try:
        return Stage(name=name, config=STAGES[name].config.model_validate(settings)), []
    except ValidationError as error:
        return None, [_describe((*where, *e["loc"]), e["msg"], e.get("input"), lines, source) for e in error.errors()]


def _describe(loc: tuple, message: str, value: Any, lines: dict, source: str) -> str:
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
    line = None
    for depth in range(len(loc), -1, -1):
        line = lines.get(tuple(loc[:depth]))
        if line is not None:
            break
    where = f"{source}, line {line}" if line else source
    shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
    return f"{where}: {field}: {message}{shown}"


def _line_map(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, int]:
    """Path of every key and list item -> 1-based line where it appears."""
    lines: dict[tuple, int] = {}
    if node is None:
        return lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, key.value)
            lines.update(_line_map(value, child))
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_map(item, (*path, index)))
    return lines


def _set_path(raw: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    target: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                raise CompressError(f"--set {dotted}: {source} has no list item {part!r} here")
            if last:
                target[int(part)] = value
            else:
                target = target[int(part)]
        elif isinstance(target, dict):
            if last:
                target[part] = value
            else:
                target = target.setdefault(part, {})
        else:
            raise CompressError(f"--set {dotted}: {'.'.join(parts[:depth])} is a value, not a mapping or list")


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` with the value read as YAML (so `3` is an int and `[a, b]` a list)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CompressError(f"--set {text!r}: expected KEY=VALUE, e.g. --set stages.0.bits=3")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise CompressError(f"--set {text!r}: the value is not valid YAML ({error})") from error
