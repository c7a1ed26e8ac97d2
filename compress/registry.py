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
    on the original model (e.g. to record a teacher's outputs for distillation).

    A block-local stage (`block` set) compresses one transformer block at a time and touches nothing outside it:
    `block(block, index, name, inputs, config, context)` compresses the block `name` in place, `inputs` being its
    calibration inputs (`compress.calib.BlockInputs`) when `calibration_batch(config)` gives a batch size, else
    None; it may return figures for the progress bar. Such stages can checkpoint after every block and stream a
    model larger than memory (`compress.blockwise`). A block-local stage's `finish(model, config, context)`, when
    set, runs after its last block on the whole model and returns whether it changed what lies outside the blocks
    (e.g. `allocate` compressing the output head; the run state then keeps the whole model); `whole_model(config)`
    says why a configuration needs the whole model (so it cannot stream), or None."""

    name: str
    config: type[BaseModel]
    apply: Callable
    quantizes: bool = False
    needs_quantized: bool = False
    check: Callable | None = None
    prepare: Callable | None = None
    block: Callable | None = None
    calibration_batch: Callable | None = None
    finish: Callable | None = None
    whole_model: Callable | None = None


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


def register_block_stage(
    name: str,
    config: type[BaseModel],
    *,
    calibration_batch: Callable,
    quantizes: bool = False,
    check: Callable | None = None,
    prepare: Callable | None = None,
    finish: Callable | None = None,
    whole_model: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Register `block(block, index, name, inputs, config, context)` as the block-local stage `name` (see
    `StageEntry`); its whole-model `apply` runs the blocks in order through `compress.blockwise.run_stage`, then
    `finish`.
    `calibration_batch(config)` is the batch size of the calibration inputs the stage needs, or None."""

    def wrap(block: Callable) -> Callable:
        from compress.blockwise import run_stage

        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")

        def apply(model, stage_config, context) -> None:
            run_stage(model, STAGES[name], stage_config, context)
            if finish is not None:
                finish(model, stage_config, context)

        STAGES[name] = StageEntry(name, config, apply, quantizes, False, check, prepare, block=block,
                                  calibration_batch=calibration_batch, finish=finish,
                                  whole_model=whole_model)  # fmt: skip
        return block

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
