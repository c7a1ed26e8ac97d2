"""`hesso`: structured pruning by training (HESSO), then physical removal of the pruned heads and channels.

The groups (compress.prune) are MLP channels and attention heads. Training runs through `accelerate` on the
calibration windows with a distillation loss against the model before the first stage (KL on its top-k next
tokens, or cosine to its last hidden states for encoders) or the next-token loss. After `warmup_steps`, each of
`pruning_periods` periods selects the next share of the target by saliency and shrinks those groups linearly to
exactly zero over `steps_per_period` steps while the rest trains (compress.solvers.hesso); `recovery_steps` then
train with every pruned group held at zero, and the held-out best of those steps is kept. With `cric`, the
candidates are probed by loss before they are committed. Finally the zeroed rows, columns and heads are removed:
if every block keeps the same sizes the config says so (a stock transformers model), else the export records the
sizes of each block (docs/FORMAT.md)."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from compress.errors import CompressError, NumericError
from compress.models import count_parameters
from compress.prune.groups import (
    GroupFamily,
    gather,
    member_tensor,
    read_groups,
    scale_groups,
    write_groups,
    zero_groups,
)
from compress.prune.structure import block_sizes, express_in_config, find_groups, remove_groups
from compress.registry import register_stage
from compress.solvers.hesso import (
    Schedule,
    corrected_scores,
    criteria,
    cumulative_target,
    output_change,
    round_kept,
    saliency,
    select,
    shrink_factor,
)
from compress.solvers.pv import next_token_nll, teacher_topk, topk_kl
from compress.stages.base import StageConfig
from compress.train_state import (
    discard_state,
    load_state,
    optimizer_tensors,
    restore_optimizer,
    save_state,
    training_directory,
)

log = logging.getLogger(__name__)

_OUTPUT_WINDOWS = 8  # calibration windows whose activations the criterion `output` is measured on


class Criteria(StageConfig):
    """Weights of the saliency criteria (see compress.solvers.hesso). HESSO's reference weighs its four equally;
    `output` (data-aware, measured on calibration windows at each period start) is off by default and is what
    recipes/hesso-minilm-30.yaml ranks by."""

    magnitude: float = Field(0.25, ge=0.0, description="a group's weight norm")
    average_magnitude: float = Field(0.25, ge=0.0, description="its norm per weight")
    cosine: float = Field(0.25, ge=0.0, description="the cosine of its weights and their gradient")
    taylor: float = Field(0.25, ge=0.0, description="first-order Taylor estimate of the loss change")
    output: float = Field(0.0, ge=0.0, description="data-aware: the change of the block's output per token")


class HessoConfig(StageConfig):
    kinds: list[Literal["mlp_channels", "attention_heads"]] = Field(
        default_factory=lambda: ["mlp_channels", "attention_heads"], min_length=1, description="groups to prune"
    )
    target_sparsity: float = Field(0.25, gt=0.0, lt=1.0, description="share of the groups of each kind removed")
    head_groups: Literal["kv", "query"] = Field(
        "kv",
        description="grouped-query attention: a KV head with its query heads, or the j-th query head of every"
        " KV head (each block keeps as many query heads per KV head)",
    )
    distribution: Literal["global", "per_layer"] = Field(
        "global", description="rank groups across all blocks (blocks end up with differing sizes) or in each block"
    )
    channel_multiple: int = Field(1, ge=1, description="MLP channels kept per block are a multiple of this")
    warmup_steps: int = Field(8, ge=0, le=1_000_000, description="training steps before the first pruning period")
    pruning_periods: int = Field(4, ge=1, le=10_000, description="periods over which the target is reached")
    steps_per_period: int = Field(16, ge=1, le=1_000_000, description="steps to shrink a period's groups to zero")
    recovery_steps: int = Field(32, ge=0, le=1_000_000, description="training steps after the last period")
    batch_size: int = Field(2, ge=1, le=4096, description="calibration windows per step (all processes together)")
    learning_rate: float = Field(3e-5, gt=0.0, description="Adam on every parameter of the model")
    loss: Literal["kl", "next_token", "embedding"] | None = Field(
        None,
        description="kl: distillation on the original's top-k next tokens; next_token; embedding: cosine to "
        "the original's last hidden states. Default: kl for causal language models, embedding for encoders",
    )
    top_k: int = Field(64, ge=1, le=4096, description="teacher tokens kept per position (loss kl)")
    criteria: Criteria = Field(default_factory=Criteria, description="weights of the saliency criteria")
    cric: bool = Field(False, description="probe each period's candidates by loss before committing them")
    cric_candidates: float = Field(2.0, ge=1.0, le=100.0, description="candidates probed per group to select")
    validation_windows: int = Field(4, ge=1, description="calibration windows held out to pick the best step")
    eval_every: int = Field(8, ge=1, description="steps between validations after pruning")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the calibration batches drawn at each step")
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="steps between training checkpoints beside the output (0: none); a rerun resumes from "
        "the last. A checkpoint holds the model, Adam's moments and the best snapshot: about 4x the model's size",
    )

    def schedule(self) -> Schedule:
        return Schedule(self.warmup_steps, self.pruning_periods, self.steps_per_period, self.recovery_steps)


def _loss_name(config: HessoConfig, kind: str) -> str:
    name = config.loss or ("kl" if kind == "causal-lm" else "embedding")
    if name != "embedding" and kind != "causal-lm":
        raise CompressError(f"hesso: loss {name!r} needs a causal language model; use loss: embedding for encoders")
    return name


def prepare(model: nn.Module, config: HessoConfig, context) -> None:
    """Record what the distillation loss compares to: the original's top-k next tokens or last hidden states."""
    windows = context.calibration_windows
    if len(windows) <= config.validation_windows:
        raise CompressError(
            f"hesso: data.calibration.num_samples ({len(windows)}) must exceed validation_windows "
            f"({config.validation_windows})"
        )
    name = _loss_name(config, context.kind)
    if name == "next_token":
        return
    recorded = []
    with torch.no_grad():
        for batch in tqdm(windows.split(4), desc="hesso teacher", unit="batch", leave=False):
            if name == "kl":
                recorded.append(teacher_topk(model(input_ids=batch, use_cache=False).logits[:, :-1], config.top_k))
            else:
                recorded.append((_hidden(model, batch).half(),))
    context.teacher["hesso"] = tuple(torch.cat(parts) for parts in zip(*recorded, strict=True))


@register_stage("hesso", HessoConfig, prepare=prepare)
def apply(model: nn.Module, config: HessoConfig, context) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    families = find_groups(model, config.kinds, config.head_groups)
    parameters_before = count_parameters(model)
    loss = _Loss(_loss_name(config, context.kind), context.teacher.pop("hesso", ()))
    windows = context.calibration_windows
    held_out = len(windows) - config.validation_windows
    validation = torch.arange(held_out, len(windows))
    schedule = config.schedule()
    generator = torch.Generator().manual_seed(config.seed)
    for parameter in model.parameters():
        parameter.requires_grad_(parameter.is_floating_point())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    wrapped = accelerator.prepare_model(model)
    probe = torch.arange(min(_OUTPUT_WINDOWS, held_out))
    pruner = _Pruner(model, families, config, optimizer, lambda: loss.evaluate(model, windows, torch.arange(2)),
                     lambda: _hidden(model, windows[probe]))  # fmt: skip
    checkpoint = _Checkpoint(context, config, model, optimizer, pruner, generator, loss.teacher, accelerator)
    resumed = checkpoint.resume()
    if resumed is None:
        start, losses, best = 1, [], ({"loss": math.inf}, 0, None)
        history = [{"step": 0, **loss.evaluate(model, windows, validation)}]
    else:
        start, losses, history, best = resumed
        log.info("hesso: resumed from the checkpoint of step %d in %s", start - 1, checkpoint.directory)
    progress = tqdm(range(start, schedule.total_steps + 1), desc="hesso", unit="step", initial=start - 1,
                    total=schedule.total_steps, disable=not accelerator.is_main_process)  # fmt: skip
    for step in progress:
        phase = schedule.phase(step)
        if phase is not None and phase[1] == 1:
            pruner.choose(phase[0])
        chosen = torch.randperm(held_out, generator=generator)[: config.batch_size]
        model.train()
        value = _step(wrapped, accelerator, loss, windows, chosen, config)
        if not math.isfinite(value):
            raise NumericError(f"hesso: the loss became {value} at step {step}; nothing was written")
        saved = pruner.before_update()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pruner.after_update(saved, shrink_factor(phase[1], config.steps_per_period) if phase else 1.0)
        if phase is not None and phase[1] == config.steps_per_period:
            pruner.commit()
        losses.append(value)
        progress.set_postfix(loss=f"{value:.4f}", pruned=pruner.summary())
        if step >= schedule.pruning_ends and (
            (step - schedule.pruning_ends) % config.eval_every == 0 or step == schedule.total_steps
        ):
            measured = loss.evaluate(model, windows, validation)
            history.append({"step": step, **measured})
            log.info("hesso step %d: validation %s", step, measured)
            if measured["loss"] < best[0]["loss"]:
                best = (measured, step, {n: p.detach().clone() for n, p in model.named_parameters()})
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < schedule.total_steps:
            checkpoint.save(step, losses, history, best)
    checkpoint.discard()
    if best[2] is not None and best[1] != schedule.total_steps:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(best[2][name])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    pruner.finish()
    context.metrics.update({
        "loss": loss.name,
        "pruned": pruner.summary(),
        "parameters_before": parameters_before,
        "parameters_after": count_parameters(model),
        "stock_config": express_in_config(model),
        "blocks": block_sizes(model),
        "best_step": best[1],
        "validation": history,
        "train_loss": [round(v, 5) for v in losses[::10]],
    })  # fmt: skip


class _Checkpoint:
    """The training state beside the output (`.<out>.hesso/`, through compress.train_state): parameters, Adam's
    state, which groups are pruned or shrinking, the best snapshot and the sampler, so that running the same recipe
    again after a crash resumes at the step after the last checkpoint and ends with the same model."""

    def __init__(self, context, config: HessoConfig, model, optimizer, pruner, generator, teacher, accelerator):
        self.directory = training_directory(context.recipe.export.out, "hesso")
        self.config, self.model, self.optimizer, self.pruner = config, model, optimizer, pruner
        self.generator, self.accelerator = generator, accelerator
        self.fingerprint = _fingerprint(config, model, teacher) if config.checkpoint_every else ""

    def save(self, step: int, losses: list[float], history: list[dict], best: tuple) -> None:
        if self.accelerator.is_main_process:
            tensors = {f"model.{n}": p for n, p in self.model.named_parameters()}
            tensors.update({f"best.{n}": t for n, t in (best[2] or {}).items()})
            tensors.update({f"pruned.{i}": m.to(torch.uint8) for i, m in enumerate(self.pruner.pruned)})
            tensors.update({f"shrinking.{i}": m.to(torch.uint8) for i, m in enumerate(self.pruner.shrinking)})
            tensors.update(optimizer_tensors("adam", self.optimizer))
            tensors["generator"] = self.generator.get_state()
            meta = {"fingerprint": self.fingerprint, "step": step, "losses": losses, "history": history,
                    "best": [best[0], best[1]]}  # fmt: skip
            save_state(self.directory, tensors, meta)
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def resume(self):
        """`(next step, losses, history, best)` from a checkpoint of this very training, or None."""
        found = load_state(self.directory) if self.config.checkpoint_every else None
        if found is None:
            return None
        tensors, meta = found
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("hesso: ignoring the checkpoint in %s, made by another run", self.directory)
            return None
        for name, parameter in self.model.named_parameters():
            parameter.copy_(tensors[f"model.{name}"])
        for i in range(len(self.pruner.pruned)):
            self.pruner.pruned[i] = tensors[f"pruned.{i}"].bool()
            self.pruner.shrinking[i] = tensors[f"shrinking.{i}"].bool()
        restore_optimizer("adam", self.optimizer, tensors)
        self.generator.set_state(tensors["generator"])
        snapshot = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")} or None
        return meta["step"] + 1, meta["losses"], meta["history"], (meta["best"][0], meta["best"][1], snapshot)

    def discard(self) -> None:
        if self.config.checkpoint_every and self.accelerator.is_main_process:
            discard_state(self.directory)


def _fingerprint(config: HessoConfig, model: nn.Module, teacher: tuple[torch.Tensor, ...]) -> str:
    """What a checkpoint must match to be resumed: the settings, the starting model and the teacher."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    for name, tensor in [*model.named_parameters(), *((f"teacher.{i}", t) for i, t in enumerate(teacher))]:
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=ids, output_hidden_states=True)
    hidden = getattr(output, "last_hidden_state", None)
    return (hidden if hidden is not None else output.hidden_states[-1]).float()


class _Loss:
    """The training loss on chosen calibration windows, and its value on held-out ones."""

    def __init__(self, name: str, teacher: tuple[torch.Tensor, ...]) -> None:
        self.name, self.teacher = name, teacher

    def __call__(self, model: nn.Module, ids: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        if self.name == "embedding":
            student, target = _hidden(model, ids), self.teacher[0][chosen].float()
            return 1 - F.cosine_similarity(student, target, dim=-1).mean()
        logits = model(input_ids=ids, use_cache=False).logits
        if self.name == "kl":
            return topk_kl(logits[:, :-1], self.teacher[0][chosen], self.teacher[1][chosen])
        return next_token_nll(logits, ids)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, windows: torch.Tensor, chosen: torch.Tensor) -> dict[str, float]:
        model.eval()
        total = sum(float(self(model, windows[part], part)) * len(part) for part in chosen.split(4))
        return {"loss": total / len(chosen)}


def _step(wrapped, accelerator, loss: _Loss, windows: torch.Tensor, chosen: torch.Tensor, config) -> float:
    """Forward and backward of this process's share of the batch; the mean loss over all processes."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(chosen) % world:
        raise CompressError(f"hesso: batch_size {len(chosen)} must be a multiple of the processes ({world})")
    mine = chosen[rank::world]
    value = loss(wrapped, windows[mine].to(accelerator.device), mine)
    accelerator.backward(value)
    return float(accelerator.reduce(value.detach(), reduction="mean"))


class _Pruner:
    """Which groups are pruned or shrinking, chosen by saliency (and CRIC), and held to the schedule."""

    def __init__(self, model: nn.Module, families: list[GroupFamily], config: HessoConfig, optimizer, probe_loss,
                 forward):  # fmt: skip
        self.model, self.families, self.config, self.optimizer = model, families, config, optimizer
        self.probe_loss, self.forward = probe_loss, forward
        self.pruned = [torch.zeros(f.count, dtype=torch.bool) for f in families]
        self.shrinking = [torch.zeros(f.count, dtype=torch.bool) for f in families]

    def _optimizer_tensors(self) -> tuple[dict, dict] | tuple[None, None]:
        """Adam's smoothed gradient and update direction by parameter name (None before the first step)."""
        gradient, direction = {}, {}
        for name, parameter in self.model.named_parameters():
            state = self.optimizer.state.get(parameter)
            if state is None or "exp_avg" not in state:
                return None, None
            gradient[name] = state["exp_avg"]
            direction[name] = -state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
        return gradient, direction

    @torch.no_grad()
    def choose(self, period: int) -> None:
        """Select the groups this period shrinks, kind by kind."""
        gradient, direction = self._optimizer_tensors()
        output = self._output_change()
        for kind in self.config.kinds:
            indices = [i for i, f in enumerate(self.families) if f.kind == kind]
            raw: dict[str, list[torch.Tensor]] = {}
            for i in indices:
                family = self.families[i]
                rows = gather(self.model, family)
                found = criteria(rows, gather(self.model, family, gradient) if gradient else None,
                                 gather(self.model, family, direction) if direction else None,
                                 output[i] if output else None)  # fmt: skip
                for name, values in found.items():
                    raw.setdefault(name, []).append(values)
            scores = saliency({k: torch.cat(v) for k, v in raw.items()}, self.config.criteria.model_dump())
            owner = torch.cat([torch.full((self.families[i].count,), j) for j, i in enumerate(indices)])
            pruned = torch.cat([self.pruned[i] for i in indices])
            chosen = self._select(scores, owner, pruned, indices, period)
            if kind == "mlp_channels" and period == self.config.pruning_periods - 1:
                chosen = round_kept(scores, owner, pruned, chosen, self.config.channel_multiple)
            for i, part in zip(indices, chosen.split([self.families[i].count for i in indices]), strict=True):
                self.shrinking[i] = part.clone()
        log.info("hesso period %d: shrinking %s", period, self.summary(self.shrinking))

    def _output_change(self) -> list[torch.Tensor] | None:
        """Criterion `output` of every family (None when its weight is 0): the inputs of each family's output
        projection (its member along columns) recorded by forward pre-hooks over the probe windows, as each
        group's mean Gram matrix."""
        if self.config.criteria.output == 0.0:
            return None
        projections = [next(m for m in family.members if m.dim == 1) for family in self.families]
        grams: list[torch.Tensor | None] = [None] * len(projections)
        tokens = [0] * len(projections)

        def recorder(i: int, index: torch.Tensor):
            def record(module, args) -> None:
                inputs = args[0].detach().reshape(-1, args[0].shape[-1])
                x = inputs[:, index.flatten()].float().view(len(inputs), *index.shape)
                gram = torch.einsum("ngi,ngj->gij", x, x)
                grams[i] = gram if grams[i] is None else grams[i] + gram
                tokens[i] += len(inputs)

            return record

        handles = [self.model.get_submodule(m.module).register_forward_pre_hook(recorder(i, m.index))
                   for i, m in enumerate(projections)]  # fmt: skip
        self.model.eval()
        try:
            self.forward()
        finally:
            for handle in handles:
                handle.remove()
        found = []
        for member, gram, count in zip(projections, grams, tokens, strict=True):
            weight = member_tensor(self.model, member).detach().float()
            columns = weight.index_select(1, member.index.flatten()).view(weight.shape[0], *member.index.shape)
            found.append(output_change(columns.permute(1, 0, 2), gram / count))
        return found

    def _select(self, scores, owner, pruned, indices, period: int) -> torch.Tensor:
        periods, sparsity = self.config.pruning_periods, self.config.target_sparsity
        if self.config.distribution == "global":
            count = cumulative_target(len(scores), sparsity, period, periods) - int(pruned.sum())
            chosen = select(scores, owner, pruned, count)
            if self.config.cric and count > 0:
                chosen = self._cric(scores, owner, pruned, indices, count)
            return chosen
        chosen = torch.zeros_like(pruned)
        for j, i in enumerate(indices):
            part = owner == j
            count = cumulative_target(self.families[i].count, sparsity, period, periods) - int(pruned[part].sum())
            chosen[part] = select(scores[part], owner[part] * 0, pruned[part], count)
        return chosen

    def _cric(self, scores, owner, pruned, indices, count: int) -> torch.Tensor:
        """Probe the `cric_candidates * count` lowest-scoring groups: zero each block's candidates together and
        measure the loss increase on a probe batch; select by saliency plus that increase per group."""
        candidates = select(scores, owner, pruned, math.ceil(self.config.cric_candidates * count))
        base = self.probe_loss()["loss"]
        increase = torch.zeros_like(scores)
        for j, i in enumerate(indices):
            mask = candidates & (owner == j)
            if not mask.any():
                continue
            family = self.families[i]
            groups = torch.nonzero(mask[owner == j]).squeeze(1)
            saved = read_groups(self.model, family, groups)
            scale_groups(self.model, family, groups, 0.0)
            increase[mask] = (self.probe_loss()["loss"] - base) / len(groups)
            write_groups(self.model, family, groups, saved)
        corrected = torch.full_like(scores, math.inf)
        corrected[candidates] = corrected_scores(scores[candidates], increase[candidates])
        return select(corrected, owner, pruned, count)

    def before_update(self) -> list[tuple[int, torch.Tensor, list[torch.Tensor]]]:
        """The shrinking groups' values before the optimizer step: they follow the schedule, not the gradient."""
        saved = []
        for i, mask in enumerate(self.shrinking):
            if mask.any():
                groups = torch.nonzero(mask).squeeze(1)
                saved.append((i, groups, read_groups(self.model, self.families[i], groups)))
        return saved

    @torch.no_grad()
    def after_update(self, saved, factor: float) -> None:
        for i, groups, values in saved:
            write_groups(self.model, self.families[i], groups, [v * factor for v in values])
        for family, mask in zip(self.families, self.pruned, strict=True):
            if mask.any():
                scale_groups(self.model, family, torch.nonzero(mask).squeeze(1), 0.0)

    def commit(self) -> None:
        for i, family in enumerate(self.families):
            self.pruned[i] |= self.shrinking[i]
            self.shrinking[i] = torch.zeros(family.count, dtype=torch.bool)

    def summary(self, masks: list[torch.Tensor] | None = None) -> dict[str, str]:
        """`{kind: "pruned/total"}` (or of `masks`)."""
        masks = self.pruned if masks is None else masks
        done = {kind: sum(int(m.sum()) for f, m in zip(self.families, masks, strict=True) if f.kind == kind)
                for kind in self.config.kinds}  # fmt: skip
        total = {kind: sum(f.count for f in self.families if f.kind == kind) for kind in self.config.kinds}
        return {kind: f"{done[kind]}/{total[kind]}" for kind in self.config.kinds}

    def finish(self) -> None:
        """Check that every pruned group is exactly zero, then remove them from the layers."""
        for family, mask in zip(self.families, self.pruned, strict=True):
            if not bool(zero_groups(self.model, family)[mask].all()):
                raise NumericError(f"hesso: pruned {family.kind} of {family.block} are not exactly zero")
        remove_groups(self.model, self.families, self.pruned)
