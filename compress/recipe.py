"""YAML recipe -> validated objects. Unknown fields are refused; every error names the file, line and field."""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import CompressError
from compress.registry import STAGES

GENERATED = "generated"  # calibration text sampled from the original model (compress/generate.py)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; recipes mean a number, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class Strict(BaseModel):
    """Unknown fields are refused, and values are not coerced: `bits: "3"` or `trust_remote_code: "yes"` is an
    error, not a guess."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSpec(Strict):
    name: str = Field("smollm2-135m", min_length=1, description="hub id, local directory, .gguf file or alias")
    trust_remote_code: bool = Field(False, description="run the model repository's own code (only if you trust it)")


class TextOrigin(Strict):
    """Where text comes from: `embedded`, a local file or a `datasets` hub name (with its config and split)."""

    source: str = Field("embedded", min_length=1, description="embedded, generated (calibration only), a local "
                        "file or a datasets hub name")  # fmt: skip
    config: str | None = Field(None, description="the datasets configuration (hub datasets)")
    split: str = Field("train", description="the datasets split")
    text_field: str = Field("text", description="the column holding the text (datasets, JSON lines)")


class TextSource(TextOrigin):
    seq_len: int = Field(512, ge=8, le=131072, description="tokens per window")


class Generation(Strict):
    """How `source: generated` samples calibration text from the original model (compress/generate.py)."""

    temperature: float = Field(1.0, gt=0, le=10, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: the smallest set of tokens this likely")
    first_token: Literal["random", "bos"] = Field(
        "random", description="random: a token drawn uniformly from the vocabulary (no special token); bos: the "
        "tokenizer's beginning-of-text token")  # fmt: skip
    batch_size: int = Field(32, ge=1, le=4096, description="sequences generated together")


class CalibrationSource(TextOrigin):
    half: Literal["first", "second", "all"] = Field(
        "first", description="which half of the text: calibration the first, evaluation the second (no overlap)")
    weight: float = Field(1.0, gt=0, le=1e6, description="share of the windows, in a mixture (`sources`)")
    generation: Generation = Field(Generation(), description="sampling settings of source: generated")

    @model_validator(mode="after")
    def _generation_only_when_generated(self) -> CalibrationSource:
        if "generation" in self.model_fields_set and self.source != GENERATED:
            raise ValueError(f"generation settings apply to source {GENERATED!r} only (source is {self.source!r})")
        return self

    def dump(self, weight: bool = True) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in ("source", "config", "split", "text_field", "half")}
        if weight:
            fields["weight"] = self.weight
        if self.source == GENERATED:
            fields["generation"] = self.generation.model_dump()
        return fields

    def origin(self) -> tuple:
        return (self.source, self.config, self.split, self.text_field)


class CalibrationData(CalibrationSource):
    """One source (`source`, ...) or a mixture (`sources`: a list of sources with weights); the windows of a
    mixture come from each source in proportion to its weight."""

    num_samples: int = Field(128, ge=1, le=1_000_000, description="calibration windows")
    seq_len: int = Field(512, ge=8, le=131072, description="tokens per window")
    sources: list[CalibrationSource] = Field(default_factory=list, max_length=64, description="a mixture: sources "
                                             "with weights, instead of one source")  # fmt: skip

    @model_validator(mode="after")
    def _one_source_or_a_mixture(self) -> CalibrationData:
        alone = {"source", "config", "split", "text_field", "half", "weight", "generation"} & self.model_fields_set
        if self.sources and alone:
            raise ValueError(f"give one source or a mixture (`sources`), not both: {sorted(alone)} set beside "
                             "sources")  # fmt: skip
        if "weight" in self.model_fields_set and not self.sources:
            raise ValueError("weight is the share of one source in a mixture (`sources`); a single source has none")
        return self

    def dump(self) -> dict[str, Any]:
        """The fields a recipe file gives, loadable again: the mixture's, or the one source's."""
        if self.sources:
            return {"num_samples": self.num_samples, "seq_len": self.seq_len,
                    "sources": [source.dump() for source in self.sources]}  # fmt: skip
        return {**super().dump(weight=False), "num_samples": self.num_samples, "seq_len": self.seq_len}

    def parts(self) -> list[CalibrationSource]:
        """The sources the windows come from: the mixture's, or this one alone."""
        if self.sources:
            return list(self.sources)
        fields = {name: getattr(self, name) for name in CalibrationSource.model_fields}
        return [CalibrationSource.model_construct(**fields)]


class EvaluationData(TextSource):
    half: Literal["first", "second", "all"] = Field(
        "second", description="which half of the text (calibration takes the first)")  # fmt: skip
    num_windows: int = Field(32, ge=1, le=1_000_000, description="windows per text evaluated")
    batch_size: int = Field(4, ge=1, le=4096, description="windows per forward")
    prompt: str = Field("The capital of France is", description="continued greedily by both models in the report")
    sample_tokens: int = Field(24, ge=0, le=4096, description="tokens of that sample; 0 for none")


class DataSpec(Strict):
    calibration: CalibrationData = Field(CalibrationData(), description="what the stages learn from")
    evaluation: EvaluationData = Field(EvaluationData(), description="what the report measures on")


class ExportSpec(Strict):
    format: Literal["packed", "dense"] = Field(
        "packed", description="packed: the compressed format (docs/FORMAT.md); dense: float16 weights for any runtime")
    out: str = Field("out/default", min_length=1, description="output checkpoint directory")

    @field_validator("out")
    @classmethod
    def _names_a_directory(cls, out: str) -> str:
        if Path(out).name in ("", ".", ".."):
            raise ValueError("must name a directory of its own (not '.', '..' or a root)")
        return out


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string: `60MB`, `2.5G`, `800M`, `3GiB` or plain bytes. K, M, G and T are powers of
    1024 with or without `B` or `iB` (as the reports' MiB figures), for disk and memory alike."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", value, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"{value!r} is not a size; write e.g. 60MB, 1.5GiB or a number of bytes")
    return int(float(match.group(1)) * 1024 ** "_KMGT".index(match.group(2).upper() or "_"))


class Budget(Strict):
    """What the `allocate` stage must fit: the whole checkpoint's weight files (`size`, every tensor and header
    counted), or the quantized layers' average stored bits per weight (`bits_per_weight`). One of the two."""

    size: int | str | None = Field(None, description="bytes, or a string such as 60MB or 1.5GiB")
    bits_per_weight: float | None = Field(None, gt=0, le=32, description="the quantized layers' average stored bits")

    @field_validator("size")
    @classmethod
    def _a_size(cls, value: int | str | None) -> int | str | None:
        if value is not None and parse_size(value) <= 0:
            raise ValueError("must be more than 0 bytes")
        return value

    @model_validator(mode="after")
    def _one_of_the_two(self) -> Budget:
        if (self.size is None) == (self.bits_per_weight is None):
            raise ValueError("give one of size (e.g. 60MB) and bits_per_weight (e.g. 2.5)")
        return self

    def bytes(self) -> int | None:
        return None if self.size is None else parse_size(self.size)


class RecipeFields(Strict):
    model: ModelSpec = Field(ModelSpec(), description="the model to compress: a name, or {name, trust_remote_code}")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds torch and the calibration windows drawn")
    data: DataSpec = Field(DataSpec(), description="calibration and evaluation text")
    budget: Budget | None = Field(None, description="what an `allocate` stage must fit")
    stages: list[dict[str, Any]] = Field(min_length=1, description="the stages, run in order")
    export: ExportSpec = Field(ExportSpec(), description="what is written, and where")


class Stage(BaseModel):
    """One step of the recipe: the registered stage `name` with its validated `config`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    config: BaseModel


class Recipe(BaseModel):
    model: ModelSpec
    seed: int
    data: DataSpec
    budget: Budget | None = None
    stages: list[Stage]
    export: ExportSpec
    path: str = "<recipe>"
    # recipe field path -> line in the file, or the `--set KEY=VALUE` that gave it
    lines: dict[tuple, int | str] = Field(default_factory=dict, exclude=True)
    overrides: dict[str, Any] = Field(default_factory=dict, exclude=True)  # `--set` fields, as given

    def problem(self, loc: tuple, message: str, value: Any = None) -> str:
        """`message` about the field at `loc`, prefixed with the recipe file and the field's line."""
        return _describe(loc, message, value, self.lines, self.path)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in), loadable again with `parse_recipe`."""
        return {
            "model": self.model.model_dump(),
            "seed": self.seed,
            "data": {"calibration": self.data.calibration.dump(), "evaluation": self.data.evaluation.model_dump()},
            **({"budget": self.budget.model_dump(exclude_none=True)} if self.budget is not None else {}),
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
        return _parse_recipe(text, source, overrides)
    except RecursionError as error:
        raise CompressError(f"recipe {source}: nested too deeply, or a YAML alias refers to itself") from error


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000  # keys, values and list items, counted as YAML aliases expand them
MAX_SHOWN = 200  # characters of a bad value quoted in a message


def _expanded_size(node: yaml.Node | None, memo: dict[int, int]) -> int:
    """How many values `node` becomes once every alias is expanded (the graph is shared, so this is linear)."""
    if node is None:
        return 0
    if id(node) not in memo:
        memo[id(node)] = 1  # a node that refers to itself is refused later, by its recursion
        children = node.value if isinstance(node.value, list) else []
        flat = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        memo[id(node)] = 1 + sum(_expanded_size(child, memo) for child in flat)
    return memo[id(node)]


def _parse_recipe(text: str, source: str, overrides: dict[str, Any] | None) -> Recipe:
    if len(text) > MAX_RECIPE_BYTES:
        raise CompressError(f"recipe {source}: {len(text)} characters; a recipe may have at most {MAX_RECIPE_BYTES}")
    try:
        node = yaml.compose(text, Loader=_Loader)
        size = _expanded_size(node, {})
        if size > MAX_RECIPE_VALUES:
            raise CompressError(f"recipe {source}: expands to {size} values (YAML aliases); a recipe may hold at "
                                f"most {MAX_RECIPE_VALUES}")  # fmt: skip
        raw = _load_yaml(text)
        lines = _line_map(node) if raw is not None else {}
    except DuplicateKey as error:
        raise CompressError(f"recipe {source}, line {error.line}: the key {error.key!r} appears twice") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise CompressError(f"recipe {source}{where}: not valid YAML ({problem})") from error
    if not isinstance(raw, dict):
        raise CompressError(f"recipe {source}: the top level must be a mapping with a `stages` list")
    raw = copy.deepcopy(raw)  # YAML aliases share objects; overrides must change one place only
    if isinstance(raw.get("model"), str):
        raw["model"] = {"name": raw["model"]}  # `model: NAME` is short for `model: {name: NAME}`
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("calibration"), list):
        # `calibration: [sources]` is short for `calibration: {sources: [...]}`
        data["calibration"] = {"sources": data["calibration"]}
        at = ("data", "calibration")
        lines = {(*at, "sources", *loc[2:]) if loc[:2] == at and len(loc) > 2 else loc: line
                 for loc, line in lines.items()}  # fmt: skip
    for dotted, value in (overrides or {}).items():
        _set_path(raw, dotted, value, source)
        path = tuple(int(part) if part.isdigit() else part for part in dotted.split("."))
        lines = {loc: line for loc, line in lines.items() if loc[: len(path)] != path}
        lines[path] = f"--set {dotted}={_shown(value)}"

    problems: list[str] = [
        _describe(loc, "text may not contain NUL characters", None, lines, source) for loc in _nul(raw)
    ]
    try:
        fields = RecipeFields.model_validate(raw)
    except ValidationError as error:
        problems += [_describe(e["loc"], _message(e, RecipeFields), e.get("input"), lines, source)
                     for e in error.errors()]  # fmt: skip
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
        model=fields.model,
        seed=fields.seed,
        data=fields.data,
        budget=fields.budget,
        stages=stages,
        export=fields.export,
        path=source,
        lines=lines,
        overrides=dict(overrides or {}),
    )


def _nul(value: Any, loc: tuple = ()) -> list[tuple]:
    """Paths of strings holding a NUL character (no file name or regex may contain one)."""
    if isinstance(value, str):
        return [loc] if "\x00" in value else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nul(k, (*loc, k)) + _nul(v, (*loc, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nul(v, (*loc, i))]
    return []


def _factory_defaults(model: type[BaseModel], schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (the model's) with the defaults pydantic leaves out: those made by a `default_factory`."""
    for name, info in model.model_fields.items():
        spec = schema.get("properties", {}).get(info.alias or name)
        if spec is not None and info.default_factory is not None and "default" not in spec:
            value = info.get_default(call_default_factory=True)
            spec["default"] = value.model_dump() if isinstance(value, BaseModel) else value
    return schema


def json_schema() -> dict[str, Any]:
    """JSON Schema of a recipe: the top-level fields, and each stage's options selected by its `stage` name."""
    schema = RecipeFields.model_json_schema()
    definitions = schema.setdefault("$defs", {})
    _factory_defaults(CalibrationData, definitions["CalibrationData"])
    variants = []
    for name in sorted(STAGES):
        config = STAGES[name].config
        stage_schema = _factory_defaults(config, config.model_json_schema(ref_template="#/$defs/{model}"))
        definitions.update(stage_schema.pop("$defs", {}))
        stage_schema["properties"] = {"stage": {"const": name}, **stage_schema.get("properties", {})}
        stage_schema["required"] = ["stage", *stage_schema.get("required", [])]
        stage_schema["additionalProperties"] = False
        stage_schema["title"] = f"stage {name}"
        variants.append(stage_schema)
    # `if stage is X then X's options` rather than `oneOf`: a typo in one stage's field is reported against that
    # stage alone, not as a failure to match every other stage
    schema["properties"]["stages"]["items"] = {
        "type": "object",
        "required": ["stage"],
        "properties": {"stage": {"enum": sorted(STAGES)}},
        "allOf": [{"if": {"properties": {"stage": {"const": v["properties"]["stage"]["const"]}}, "required": ["stage"]},
                   "then": v} for v in variants],
    }  # fmt: skip
    schema["properties"]["model"] = {"anyOf": [{"type": "string", "minLength": 1}, schema["properties"]["model"]]}
    calibration = definitions["DataSpec"]["properties"]["calibration"]
    mixture = {"type": "array", "items": {"$ref": "#/$defs/CalibrationSource"}, "minItems": 1, "maxItems": 64}
    definitions["DataSpec"]["properties"]["calibration"] = {"anyOf": [mixture, {"$ref": calibration.pop("$ref")}],
                                                            **calibration}  # `calibration: [sources]`  # fmt: skip
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "compress recipe"
    return schema


def _validate_stage(index: int, entry: Any, lines: dict, source: str) -> tuple[Stage | None, list[str]]:
    where = ("stages", index)
    if not isinstance(entry, dict) or "stage" not in entry:
        return None, [_describe(where, "each stage is a mapping with a `stage: NAME` key", entry, lines, source)]
    name = entry["stage"]
    if not isinstance(name, str) or name not in STAGES:
        message = f"unknown stage; valid stages are {', '.join(sorted(STAGES))}"
        return None, [_describe((*where, "stage"), message, name, lines, source)]
    settings = {k: v for k, v in entry.items() if k != "stage"}
    try:
        return Stage(name=name, config=STAGES[name].config.model_validate(settings)), []
    except ValidationError as error:
        return None, [_describe((*where, *e["loc"]), _message(e, STAGES[name].config, ("stage",)), e.get("input"),
                                lines, source) for e in error.errors()]  # fmt: skip


def _message(error: dict, model: type[BaseModel], extra_fields: tuple[str, ...] = ()) -> str:
    """pydantic's message, and for an unknown field the nearest valid name and every valid one."""
    if error["type"] != "extra_forbidden":
        return error["msg"]
    *parents, name = error["loc"]
    for part in parents:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        nested = [t for t in getattr(field.annotation, "__args__", (field.annotation,)) if isinstance(t, type)
                  and issubclass(t, BaseModel)] if field is not None else []  # fmt: skip
        if not nested:
            return "unknown field"
        model, extra_fields = nested[0], ()
    valid = [*extra_fields, *model.model_fields]
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return f"unknown field; {hint}valid fields: {', '.join(valid)}"


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:60] + "..."


def _describe(loc: tuple, message: str, value: Any, lines: dict, source: str) -> str:
    message = message.removeprefix("Value error, ")
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
    line = None
    for depth in range(len(loc), -1, -1):
        line = lines.get(tuple(loc[:depth]))
        if line is not None:
            break
    where = line if isinstance(line, str) else f"{source}, line {line}" if line else source
    shown = "" if isinstance(value, dict) or value is None else repr(value)
    shown = shown if len(shown) <= MAX_SHOWN else f"{shown[:MAX_SHOWN]}... ({len(shown)} characters)"
    shown = f" (got {shown})" if shown else ""
    return f"{where}: {field}: {message}{shown}"


class DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        self.key, self.line = key, line


def _line_map(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, int]:
    """Path of every key and list item -> 1-based line where it appears."""
    lines: dict[tuple, int] = {}
    if node is None:
        return lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        keys = [key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and keys.count(key.value) > 1:
                raise DuplicateKey(key.value, key.start_mark.line + 1)
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
        return key.strip(), _load_yaml(value)
    except yaml.YAMLError as error:
        raise CompressError(f"--set {text!r}: the value is not valid YAML ({error})") from error
