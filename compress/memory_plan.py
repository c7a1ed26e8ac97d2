"""`--max-memory`: estimate, before any weight is read, the peak memory of a run in memory and streamed, choose
the mode that fits the budget, or refuse at the start saying what the run needs.

The estimate counts the model's float32 tensors from its config (on a skeleton, no weights read), the working
copies a block needs while it is compressed, the calibration and evaluation activations, the per-layer input
statistics of data-driven stages, and the process itself (torch and transformers loaded). It is an estimate:
the figures in docs/operations.md come from `scripts/bench_scale.py`, which measures the real peak against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from compress.errors import CompressError
from compress.models import (
    LINEAR_TYPES,
    dense_weight,
    find_blocks,
    find_linears,
    load_config,
    resolve_model,
    skeleton,
    unique_tensors,
)
from compress.recipe import Recipe
from compress.recipe import parse_size as recipe_size
from compress.registry import STAGES

log = logging.getLogger(__name__)

# Python with torch, transformers and compress imported is about 300 MiB; at work, with the allocator's residue, the
# measured peaks of scripts/bench_scale.py (a 1.46B model) are met with this figure.
PROCESS_BYTES = 800 * 2**20
BLOCK_COPIES = 8  # a block's weights, its compressed layers, layer-sized temporaries (int64 codes, the search) and
# the allocator's fragmentation: met the nupes peak of scripts/bench_scale.py (2.03 GiB) with a margin
TRAINING_COPIES = 5  # weights, gradients, two Adam moments, the teacher (pv_tuning, hesso)


@dataclass
class MemoryPlan:
    stream: bool
    offload: bool = False
    in_memory: dict[str, int] = field(default_factory=dict)
    streamed: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def total(parts: dict[str, int]) -> int:
        return sum(parts.values())


def parse_size(text: str) -> int:
    """`2.5GB`, `2500MB`, `2.5G`, `800M`, `3GiB` or plain bytes -> bytes (GB and G both mean 2^30)."""
    try:
        return recipe_size(text)
    except ValueError as error:
        raise CompressError(f"--max-memory {text!r}: expected a size such as 2.5GB, 800MB or 3000000000") from error


def estimate(recipe: Recipe, model: nn.Module, offload: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """(in memory, streamed) peak estimates in bytes, by part, for `recipe` on the skeleton `model`; streamed, the
    parts of the larger of its two phases (the start and end, or the blocks' turn). With `offload`, the calibration
    activations count one batch (inputs, outputs and the one being computed), the rest being on disk."""
    prefix, blocks = find_blocks(model)
    state = model.state_dict(keep_vars=True)
    sizes = {name: state[name].numel() * 4 for name in unique_tensors(model)}
    total = sum(sizes.values())
    outside = sum(size for name, size in sizes.items() if not name.startswith(prefix + "."))
    block = max(sum(s for n, s in sizes.items() if n.startswith(f"{prefix}.{i}.")) for i in range(len(blocks)))
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    calibration = recipe.data.calibration
    evaluation = recipe.data.evaluation
    batches = [
        STAGES[s.name].calibration_batch(s.config) or 0
        for s in recipe.stages
        if STAGES[s.name].calibration_batch is not None
    ]
    calibrates = any(batches)
    training = any(STAGES[s.name].block is None for s in recipe.stages)
    held = min(max(batches, default=0), calibration.num_samples) if offload else calibration.num_samples
    activations = 3 * held * calibration.seq_len * hidden * 4 if calibrates else 0
    statistics = 0
    if calibrates:
        linears = find_linears(blocks[0], list(LINEAR_TYPES), []).values()
        statistics = sum(4 * dense_weight(linear).shape[1] ** 2 for linear in linears)
    logits = 4 * evaluation.batch_size * evaluation.seq_len * vocab * 4  # logits, log-probs and their temporaries
    in_memory = {
        "process": PROCESS_BYTES,
        "model (float32)": total * (TRAINING_COPIES if training else 1),
        "loading it (a second copy while transformers converts)": total,
        "block being compressed": block * (BLOCK_COPIES - 1),
        "calibration activations": activations,
        "layer input statistics": statistics,
        "evaluation logits": logits,
    }
    streams = 2 * evaluation.num_windows * evaluation.seq_len * hidden * 4
    # Streamed, the tensors outside the blocks are in memory at the start and the end only, the blocks in between.
    ends = {
        "process": PROCESS_BYTES,
        "embeddings and head (float32)": outside,
        "evaluation streams": streams,
        "evaluation logits": logits,
    }
    middle = {
        "process": PROCESS_BYTES,
        "block being compressed": block * BLOCK_COPIES,
        "calibration activations": activations,
        "layer input statistics": statistics,
        "evaluation streams": streams,
    }
    streamed = ends if sum(ends.values()) >= sum(middle.values()) else middle
    return in_memory, streamed


def plan_memory(recipe: Recipe, budget: int, stream: bool, offload: bool = False) -> MemoryPlan:
    """The first of: in memory, in memory with the calibration activations on disk, streamed, streamed with them on
    disk, that fits `budget` (streaming and offloading when asked for; streaming only if the recipe can); else a
    `CompressError` that lists what the run needs."""
    from compress.pipeline import streaming_problems

    source = resolve_model(recipe.model.name)
    config, kind = load_config(source, trust_remote_code=recipe.model.trust_remote_code)
    model = skeleton(config, kind, trust_remote_code=recipe.model.trust_remote_code)
    estimates = {flag: estimate(recipe, model, flag) for flag in (False, True)}
    problems = streaming_problems(recipe)
    for streamed in (False, True):
        for offloaded in (False, True):
            if (stream and not streamed) or (offload and not offloaded) or (streamed and problems):
                continue
            parts = estimates[offloaded][1 if streamed else 0]
            if MemoryPlan.total(parts) <= budget:
                mode = ("streamed block by block" if streamed else "in memory") + (
                    ", calibration activations on disk" if offloaded else ""
                )
                log.info("--max-memory: %s, about %s of %s", mode, _gib(MemoryPlan.total(parts)), _gib(budget))
                return MemoryPlan(streamed, offloaded, *estimates[offloaded])
    in_memory, streamed = estimates[True]  # the smallest: calibration activations on disk
    lines = [f"--max-memory {_gib(budget)} is too small for this run."]
    if not stream:
        lines.append(f"In memory it needs about {_gib(MemoryPlan.total(in_memory))}: {_parts(in_memory)}.")
    if problems:
        lines.append("It cannot stream: " + "; ".join(problems))
    else:
        lines.append(f"Streamed block by block it needs about {_gib(MemoryPlan.total(streamed))}: {_parts(streamed)}.")
    lines.append("(Both with the calibration activations on disk.) Fewer evaluation windows, a smaller calibration "
                 "batch or a shorter seq_len need less.")  # fmt: skip
    raise CompressError(" ".join(lines))


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _parts(parts: dict[str, int]) -> str:
    return ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in parts.items() if size)
