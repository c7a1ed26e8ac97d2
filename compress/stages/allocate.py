"""`allocate`: each layer's format and bits chosen by measured sensitivity to fit the recipe's `budget`.

Before any stage, on the original model: the diagonal Fisher information of every selected layer's weight, from
the gradients of the next-token loss on calibration windows (one window per backward pass, squared and averaged
per token); then, for every layer and candidate, the candidate's own quantization of that layer alone (its
data-free form) and the predicted increase of the per-token loss (KL) it causes, `0.5 * sum(F * (W - Q)^2)`;
and each candidate's exact stored size for that layer. The choice of one candidate per layer that fits the budget
with the least predicted loss is a multiple-choice knapsack, solved exactly (compress/solvers/allocation.py).
Then block by block, every candidate stage compresses the layers it was given, through the same block loop as
the stage alone (checkpointed and resumable).

With `head` options (the `head` stage's settings, e.g. `{bits: 8}`) and a size budget, the output head is one
more item of the knapsack: float16 as it is, or each option, measured the same way (its Fisher information, which
for a head tied to the embedding counts both uses of the shared matrix, as the quantized matrix serves both). After
the last block, the chosen option compresses the head as the `head` stage would.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator
from torch import nn
from tqdm.auto import tqdm

from compress.errors import CompressError
from compress.formats.base import QuantizedLinear, _stored_bits
from compress.formats.power import PowerLinear
from compress.formats.uniform import UniformLinear
from compress.models import dense_weight, unique_tensors
from compress.registry import STAGES, register_block_stage
from compress.solvers.allocation import choose
from compress.stages import head as head_stage
from compress.stages.base import LayerSelection, block_linears, blocks_with_linears

log = logging.getLogger(__name__)

CANDIDATE_STAGES = ("rtn", "nupes")  # grid formats: a layer's stored size is known before it is compressed
DEFAULT_CANDIDATES = [{"stage": "nupes", "mode": "data-driven", "bits": bits} for bits in (2, 3, 4)] + [
    {"stage": "rtn", "bits": 8}
]
METADATA_BOUND = 256  # bytes of the safetensors `__metadata__` entry, at most
HEADER_SLACK = 16  # the 8-byte length prefix and the padding of the header to 8 bytes


class AllocateConfig(LayerSelection):
    candidates: list[dict[str, Any]] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_CANDIDATES), min_length=1, max_length=32,
        description="the stage settings each layer may take, e.g. {stage: nupes, bits: 3}; rtn and nupes",
    )  # fmt: skip
    sensitivity_windows: int = Field(16, ge=1, le=4096, description="calibration windows the Fisher is measured on")
    head: list[dict[str, Any]] = Field(
        default_factory=list, max_length=8,
        description="settings the output head may take instead of float16, e.g. {bits: 8} (the head stage's); "
        "with a size budget",
    )  # fmt: skip

    @field_validator("head")
    @classmethod
    def _valid_head(cls, options: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, option in enumerate(options):
            parse_head(option, index)
        return options

    @field_validator("candidates")
    @classmethod
    def _valid_candidates(cls, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, candidate in enumerate(candidates):
            parse_candidate(candidate, index)
        batches = {STAGES[c["stage"]].calibration_batch(parse_candidate(c, i)) for i, c in enumerate(candidates)}
        if len(batches - {None}) > 1:
            raise ValueError(f"the data-driven candidates take calibration batches of {sorted(batches - {None})} "
                             "windows; give them one batch_size")  # fmt: skip
        return candidates

    def parsed(self) -> list[tuple[str, Any]]:
        """(stage name, its validated config) of each candidate."""
        return [(c["stage"], parse_candidate(c, i)) for i, c in enumerate(self.candidates)]

    def head_options(self) -> list[head_stage.HeadConfig]:
        return [parse_head(option, index) for index, option in enumerate(self.head)]


def parse_head(option: Any, index: int) -> head_stage.HeadConfig:
    if not isinstance(option, dict):
        raise ValueError(f"head[{index}]: a mapping of the head stage's settings, e.g. {{bits: 8}} (got {option!r})")
    try:
        return head_stage.HeadConfig.model_validate(option)
    except ValidationError as error:  # say which option
        raise ValueError(f"head[{index}]: {_brief(error)}") from error


def _brief(error: ValidationError) -> str:
    """pydantic's errors as `field: message (got value)`, one per problem."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']} (got {e.get('input')!r})"
                     for e in error.errors())  # fmt: skip


def head_label(config: head_stage.HeadConfig | None) -> str:
    return "head float16" if config is None else f"head uniform w{config.bits} g{config.group_size or 'row'}"


def parse_candidate(candidate: Any, index: int):
    if not isinstance(candidate, dict) or candidate.get("stage") not in CANDIDATE_STAGES:
        stage = candidate.get("stage") if isinstance(candidate, dict) else candidate
        raise ValueError(f"candidates[{index}]: a mapping with stage: one of {', '.join(CANDIDATE_STAGES)} (got "
                         f"{stage!r}; codebook formats are not yet candidates: their size depends on the data)")
    options = {k: v for k, v in candidate.items() if k != "stage"}
    if {"targets", "ignore"} & options.keys():
        raise ValueError(f"candidates[{index}]: targets and ignore are allocate's own (a candidate takes the layers "
                         "it is given)")  # fmt: skip
    try:
        return STAGES[candidate["stage"]].config.model_validate(options)
    except ValidationError as error:  # say which candidate
        raise ValueError(f"candidates[{index}] ({candidate['stage']}): {_brief(error)}") from error


def label(stage: str, config) -> str:
    group = config.group_size or "row"
    mode = f" {config.mode}" if getattr(config, "mode", None) else ""
    return f"{stage}{mode} w{config.bits} g{group}"


def candidate_module(stage: str, config, out_features: int, in_features: int, bias: bool) -> QuantizedLinear:
    """An empty module of the format `stage` would write for a layer of this shape (on the meta device)."""
    group = config.group_size or in_features
    with torch.device("meta"):
        if stage == "rtn":
            return UniformLinear.empty(in_features, out_features, bias, {"bits": config.bits, "group_size": group})
        settings = {"bits": config.bits, "group_size": group, "exponent_per": config.exponent_per}
        return PowerLinear.empty(in_features, out_features, bias, settings)


def _entry_bytes(name: str, shape: tuple[int, ...], offset_digits: int) -> int:
    """The most bytes one tensor's entry takes in the safetensors header."""
    shape_text = json.dumps(list(shape), separators=(",", ":"))
    return len(json.dumps(name)) + len('{"dtype":"BF16","shape":,"data_offsets":[,]},') + len(shape_text) + \
        2 * offset_digits  # fmt: skip


def stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * _stored_bits(t) // 8 for t in module.state_dict().values())


def written_bytes(name: str, module: QuantizedLinear, digits: int) -> int:
    """What a compressed layer `name` adds to the checkpoint: its tensors, their header entries and the empty
    `NAME.weight` placeholder (docs/FORMAT.md)."""
    header = sum(_entry_bytes(f"{name}.{k}", tuple(t.shape), digits) for k, t in module.state_dict().items())
    return stored_bytes(module) + header + _entry_bytes(f"{name}.weight", (0,), digits)


@dataclass
class Sizes:
    """What a candidate costs for each layer, in the budget's unit, and what the rest of the checkpoint takes."""

    per_layer: dict[str, list[int]]  # layer -> cost of each candidate (None-free; a misfit is excluded by cost)
    fixed: int  # the tensors allocate does not choose for, headers included (0 for a bits budget)
    available: int  # what the chosen layers may take
    unit: str  # "bytes" or "bits"
    head: list[int] | None = None  # the output head: float16, then each head option (with head options only)

    def items(self) -> list[list[int]]:
        """Every item of the knapsack: the layers in order, then the head when it is one."""
        return [*self.per_layer.values(), *([self.head] if self.head is not None else [])]


def budget_sizes(model: nn.Module, config: AllocateConfig, budget, layers: dict[str, tuple[int, int]]) -> Sizes:
    """Exact sizes of every candidate for every layer, on the real model or a meta skeleton."""
    parsed = config.parsed()
    modules = dict(model.named_modules())
    biases = {name: getattr(modules[name], "bias", None) is not None for name in layers}
    if budget.bits_per_weight is not None:
        weights = sum(out * inp for out, inp in layers.values())
        per_layer = {}
        for name, (out, inp) in layers.items():
            costs = []
            for stage, cfg in parsed:
                module = candidate_module(stage, cfg, out, inp, False)
                costs.append(sum(t.numel() * _stored_bits(t) for t in module.state_dict().values()))
            per_layer[name] = costs
        return Sizes(per_layer, 0, math.floor(budget.bits_per_weight * weights), "bits")
    total = budget.bytes()
    digits = len(str(max(total, 1) * 4))  # offsets are below the file's size; generous
    state = model.state_dict(keep_vars=True)
    chosen = {f"{name}.{part}" for name in layers for part in ("weight", "bias")}
    head = head_sizes(model, config, digits) if config.head else None
    if head is not None:
        chosen |= head[0]
    fixed = 0
    for tensor_name in unique_tensors(model):
        if tensor_name in chosen:
            continue
        tensor = state[tensor_name]
        fixed += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
        fixed += _entry_bytes(tensor_name, tuple(tensor.shape), digits)
    fixed += METADATA_BOUND + HEADER_SLACK
    per_layer = {}
    for name, (out, inp) in layers.items():
        costs = []
        for stage, cfg in parsed:
            costs.append(written_bytes(name, candidate_module(stage, cfg, out, inp, biases[name]), digits))
        per_layer[name] = costs
    return Sizes(per_layer, fixed, total - fixed, "bytes", head[1] if head is not None else None)


def head_sizes(model: nn.Module, config: AllocateConfig, digits: int) -> tuple[set[str], list[int]]:
    """The stored names of the output head's tensors (the embedding's, when tied), and the bytes the head takes
    as float16 and under each head option: its codes and scales, their header entries and the placeholder, plus
    the float16 copy an embedding of its own kind keeps when it cannot read the head's codes."""
    name, head = head_stage.output_head(model)
    state = model.state_dict(keep_vars=True)
    own = {n: state[n] for n in unique_tensors(model) if state[n] is head.weight or state[n] is head.bias}
    float16 = sum(t.numel() * 2 + _entry_bytes(n, tuple(t.shape), digits) for n, t in own.items())
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out_features, in_features = head.weight.shape
    copy_bytes = 0
    tied = embedding is not None and getattr(embedding, "weight", None) is head.weight
    if tied and type(embedding) is not nn.Embedding:
        embedding_name = next(n for n, m in model.named_modules() if m is embedding)
        copy_bytes = head.weight.numel() * 2 + _entry_bytes(f"{embedding_name}.weight", (out_features, in_features),
                                                             digits)  # fmt: skip
    costs = [float16]
    for option in config.head_options():
        settings = {"bits": option.bits, "group_size": option.group_size or in_features}
        with torch.device("meta"):
            module = UniformLinear.empty(in_features, out_features, head.bias is not None, settings)
        costs.append(written_bytes(name, module, digits) + copy_bytes)
    return set(own), costs


def _fits(stage: str, config, shape: tuple[int, int]) -> bool:
    group = config.group_size
    return not group or shape[1] % group == 0


def budget_problems(model: nn.Module, config: AllocateConfig, budget, layers: dict[str, tuple[int, int]]) -> list[str]:
    """Whether the budget can be met: the smallest and largest the candidates can make it, against the budget."""
    if budget is None:
        return ["allocate fits a budget, and the recipe has none: add `budget: {size: 60MB}` or "
                "`{bits_per_weight: 2.5}`, or pass --target-size / --target-bits"]  # fmt: skip
    if config.head and budget.bits_per_weight is not None:
        return ["head options count against a size budget (the whole checkpoint); a bits_per_weight budget counts "
                "the blocks' layers only: use `budget: {size: ...}` or remove allocate's `head`"]  # fmt: skip
    if config.head:
        try:
            _, head = head_stage.output_head(model)
        except CompressError as error:
            return [str(error).replace("head: ", "allocate's head options: ", 1).replace("the stage", "them")]
        width = head.in_features
        misfit = next((o.group_size for o in config.head_options() if o.group_size and width % o.group_size), None)
        if misfit is not None:
            return [f"head option group_size {misfit} does not divide the head's {width} input features"]
    parsed = config.parsed()
    misfits = [name for name, shape in layers.items() if not any(_fits(s, c, shape) for s, c in parsed)]
    if misfits:
        return [f"no candidate's group size divides the input features of {misfits[0]} ({layers[misfits[0]][1]})"]
    sizes = budget_sizes(model, config, budget, layers)
    allowed = {name: [c for c, (s, cfg) in zip(costs, parsed, strict=True) if _fits(s, cfg, layers[name])]
               for name, costs in sizes.per_layer.items()}  # fmt: skip
    head = [sizes.head] if sizes.head is not None else []
    smallest = sizes.fixed + sum(min(c) for c in [*allowed.values(), *head])
    largest = sizes.fixed + sum(max(c) for c in [*allowed.values(), *head])
    needed = sizes.fixed + sizes.available
    if smallest <= needed:
        return []
    if sizes.unit == "bits":
        weights = sum(out * inp for out, inp in layers.values())
        return [f"bits_per_weight {budget.bits_per_weight} is below the least these candidates store: "
                f"reachable {smallest / weights:.3f} to {largest / weights:.3f} bits per weight"]  # fmt: skip
    what = "every layer and the head" if head else "every layer"
    return [f"size {budget.size} ({needed} bytes) is below the smallest checkpoint these candidates make: reachable "
            f"{_mb(smallest)} to {_mb(largest)} ({what} at its smallest / largest candidate, the rest of the "
            "checkpoint as float16)"]  # fmt: skip


def _mb(value: int) -> str:
    return f"{value / 2**20:.2f} MiB ({value} bytes)"


def fisher_diagonals(model: nn.Module, linears: dict[str, nn.Module], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token diagonal Fisher information of each layer's weight `[out, in]`: the squared gradient of each
    window's summed next-token loss, summed over the windows and divided by the tokens."""
    flags = {p: p.requires_grad for p in model.parameters()}
    weights = {name: linear.weight for name, linear in linears.items()}
    sums = {name: torch.zeros(dense_weight(linear).shape) for name, linear in linears.items()}
    tokens = 0
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(True)
        for window in tqdm(windows, desc="allocate: sensitivity", unit="window", leave=False):
            ids = window[None].to(next(iter(weights.values())).device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            grads = torch.autograd.grad(loss, list(weights.values()))
            for (name, linear), grad in zip(linears.items(), grads, strict=True):
                grad = grad.t() if type(linear).__name__ == "Conv1D" else grad
                sums[name] += grad.detach().float().cpu() ** 2
            tokens += ids.shape[1] - 1
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
    return {name: total / tokens for name, total in sums.items()}


class _Scratch:
    """The context a candidate stage sees while it quantizes one layer to measure it: nothing is recorded."""

    def record_layer(self, *args, **kwargs) -> None:
        pass


def proxy_quantization(stage: str, config, name: str, linear: nn.Module) -> QuantizedLinear:
    """`linear` quantized by the candidate alone, in its data-free form (no calibration inputs)."""
    parent, _, child = name.rpartition(".")
    holder = nn.Module()
    setattr(holder, child, copy.deepcopy(linear))
    if getattr(config, "mode", None) == "data-driven":
        config = config.model_copy(update={"mode": "data-free"})
    config = config.model_copy(update={"ignore": []})
    STAGES[stage].block(holder, 0, parent, None, config, _Scratch())
    quantized = getattr(holder, child)
    if not isinstance(quantized, QuantizedLinear):
        raise CompressError(f"allocate: candidate {stage} left layer {name} unquantized")
    return quantized


def prepare(model: nn.Module, config: AllocateConfig, context) -> None:
    """Measure every layer's sensitivity to every candidate (and the head's to each head option) and choose, on
    the original model."""
    budget = context.recipe.budget
    linears = {name: linear for _, found in blocks_with_linears(model, config) for name, linear in found.items()}
    shapes = {name: tuple(dense_weight(linear).shape) for name, linear in linears.items()}
    problems = budget_problems(model, config, budget, shapes)
    if problems:
        raise CompressError("allocate: " + "; ".join(problems))
    head_name, head = head_stage.output_head(model) if config.head else (None, None)
    windows = context.calibration_windows[: config.sensitivity_windows]
    fisher = fisher_diagonals(model, {**linears, **({head_name: head} if head is not None else {})}, windows)
    parsed = config.parsed()
    labels = [label(stage, cfg) for stage, cfg in parsed]
    sizes = budget_sizes(model, config, budget, shapes)
    costs: list[list[float]] = []
    for name, linear in tqdm(linears.items(), desc="allocate: candidates", unit="layer", leave=False):
        weight = dense_weight(linear).float()
        row = []
        for stage, cfg in parsed:
            if not _fits(stage, cfg, shapes[name]):
                row.append(math.inf)
                continue
            delta = weight - proxy_quantization(stage, cfg, name, linear).dequantize().detach()
            row.append(0.5 * float((fisher[name] * delta.square()).sum()))
        costs.append(row)
    head_costs = head_sensitivity(head, config.head_options(), fisher[head_name]) if head is not None else []
    names = list(linears)
    choice, unit = choose([*costs, *([head_costs] if head_costs else [])], sizes.items(), sizes.available)
    allocation = {name: choice[i] for i, name in enumerate(names)}
    used = sum(size[j] for size, j in zip(sizes.items(), choice, strict=True))
    predicted = sum(costs[i][choice[i]] for i in range(len(names)))
    summary = {
        "budget": budget.size if budget.size is not None else budget.bits_per_weight,
        "budget_unit": "bytes" if budget.size is not None else "bits per weight",
        "predicted_kl": predicted + (head_costs[choice[-1]] if head_costs else 0.0),
        "chosen_" + sizes.unit: used + sizes.fixed,
        "allowed_" + sizes.unit: sizes.available + sizes.fixed,
        "rounding_unit": unit,
        "sensitivity_windows": len(windows),
    }
    context.teacher["allocate"] = {
        "choice": allocation,
        "labels": labels,
        "predicted": {name: costs[i] for i, name in enumerate(names)},
        "summary": summary,
        "layers_per_candidate": {lab: sum(1 for j in allocation.values() if j == k) for k, lab in enumerate(labels)},
    }
    if head_costs:
        head_labels = [head_label(None), *map(head_label, config.head_options())]
        summary["head"] = head_labels[choice[-1]]
        context.teacher["allocate"]["head"] = {"name": head_name, "choice": choice[-1], "labels": head_labels,
                                               "predicted": head_costs}  # fmt: skip
    counts = context.teacher["allocate"]["layers_per_candidate"]
    log.info("allocate: %s%s", ", ".join(f"{count} x {lab}" for lab, count in counts.items()),
             f"; output head: {summary['head']}" if head_costs else "")  # fmt: skip


def head_sensitivity(head: nn.Module, options: list, fisher: torch.Tensor) -> list[float]:
    """The predicted loss increase of the head kept float16 (none: every candidate is measured against the
    float16 model) and under each head option, as for the layers."""
    weight = dense_weight(head).float()
    costs = [0.0]
    for option in options:
        quantized = UniformLinear.from_weight(weight, None, option.bits, option.group_size or weight.shape[1])
        costs.append(0.5 * float((fisher * (weight - quantized.dequantize()).square()).sum()))
    return costs


def finish(model: nn.Module, config: AllocateConfig, context) -> bool:
    """After the last block: the output head compressed with the option the allocation chose, if any."""
    chosen = context.teacher.get("allocate", {}).get("head")
    if chosen is None or chosen["choice"] == 0:
        return False
    head_stage.apply(model, config.head_options()[chosen["choice"] - 1], context)
    context.layers[chosen["name"]]["allocation"] = {
        "candidate": chosen["labels"][chosen["choice"]],
        "predicted_kl": chosen["predicted"][chosen["choice"]],
        "predicted_kl_per_candidate": dict(zip(chosen["labels"], chosen["predicted"], strict=True)),
    }
    return True


def _whole_model(config: AllocateConfig) -> str | None:
    return "head options compress the output head, outside the blocks: a streamed run cannot" if config.head else None


def _calibration_batch(config: AllocateConfig) -> int | None:
    batches = [STAGES[stage].calibration_batch(cfg) for stage, cfg in config.parsed()]
    return next((b for b in batches if b is not None), None)


def check(config: AllocateConfig, layers: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    parsed = config.parsed()
    misfits = [name for name, shape in layers.items() if not any(_fits(s, c, shape) for s, c in parsed)]
    if misfits:
        return [("candidates", f"no candidate's group size divides the input features of {misfits[0]}")]
    return []


@register_block_stage("allocate", AllocateConfig, calibration_batch=_calibration_batch, quantizes=True, check=check,
                      prepare=prepare, finish=finish, whole_model=_whole_model)  # fmt: skip
def compress_block(block, index: int, name: str, inputs, config: AllocateConfig, context) -> None:
    allocation = context.teacher.get("allocate")
    if allocation is None:
        raise CompressError("allocate: the allocation is measured before the first stage; nothing measured it")
    mine = {f"{name}.{relative}" for relative in block_linears(block, name, config)}
    for number, (stage, cfg) in enumerate(config.parsed()):
        chosen = {full for full in mine if allocation["choice"][full] == number}
        if not chosen:
            continue
        others = [f"^{re.escape(full)}$" for full in sorted(mine - chosen)]
        restricted = cfg.model_copy(update={"targets": config.targets, "ignore": [*config.ignore, *others]})
        outer = context.metrics  # each candidate stage keeps its own figures, under its label
        context.metrics = outer.setdefault("candidates", {}).setdefault(allocation["labels"][number], {})
        try:
            STAGES[stage].block(block, index, name, inputs, restricted, context)
        finally:
            context.metrics = outer
        for full in chosen:
            context.layers[full]["allocation"] = {
                "candidate": allocation["labels"][number],
                "predicted_kl": allocation["predicted"][full][number],
                "predicted_kl_per_candidate": dict(zip(allocation["labels"], allocation["predicted"][full],
                                                       strict=True)),  # fmt: skip
            }
    context.metrics["summary"] = allocation["summary"]  # the stage's figures (each block alike)
    context.metrics["layers_per_candidate"] = allocation["layers_per_candidate"]


apply = STAGES["allocate"].apply
