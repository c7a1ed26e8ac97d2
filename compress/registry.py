"""Name -> stage and name -> format registries, filled by explicit imports in `compress.stages` and
`compress.formats`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

T = TypeVar("T")


@dataclass(frozen=True)
class StageEntry:
    """A stage: `apply(model, config, context)`, its options, and what `compress validate` checks before a run.

    `quantizes`: the stage replaces the layers it selects by compressed ones (no later stage may quantize them
    again). `needs_quantized`: the stage works on compressed layers, so a quantizing stage must come first.
    `check(config, layers)` returns `(field, problem)` pairs for the `{name: (out_features, in_features)}` of the
    layers the stage would select. `prepare(model, config, context)` runs before the first stage of the recipe,
    on the original model (e.g. to record a teacher's outputs for distillation)."""

    name: str
    config: type[BaseModel]
    apply: Callable
    quantizes: bool = False
    needs_quantized: bool = False
    check: Callable | None = None
    prepare: Callable | None = None


STAGES: dict[str, StageEntry] = {}
FORMATS: dict[str, type] = {}


def register_stage(
    name: str,
    config: type[BaseModel],
    *,
    quantizes: bool = False,
    needs_quantized: bool = False,
    check: Callable | None = None,
    prepare: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Register `apply(model, config, context)` as the stage `name` configured by `config` (see `StageEntry`)."""

    def wrap(apply: Callable) -> Callable:
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        STAGES[name] = StageEntry(name, config, apply, quantizes, needs_quantized, check, prepare)
        return apply

    return wrap


def register_format(name: str) -> Callable[[type[T]], type[T]]:
    """Register a quantized-linear module class under `name` (its `format` attribute)."""

    def wrap(cls: type[T]) -> type[T]:
        if name in FORMATS:
            raise ValueError(f"format {name!r} is registered twice")
        cls.format = name
        FORMATS[name] = cls
        return cls

    return wrap
