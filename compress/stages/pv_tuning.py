"""`pv_tuning`: fine-tune a compressed model against the original through the format interface only.

The loss is KL(teacher || student) on next-token distributions over the calibration windows. The teacher is the
model before the first stage; its top-k log-probabilities per position are recorded then (a few MiB, instead of
a second model in memory or full-vocabulary logits on disk), and the KL is taken over those k tokens plus one
bucket for the rest of the vocabulary.

Each step: (P) Adam on every continuous parameter of the compressed layers (scales, exponents, codebooks) and on
the norms and biases, with exact gradients through `dequantize()`; (V) the gradient with respect to each dense
weight feeds a straight-through buffer (Adam), and only the `code_update_fraction` of weights whose buffer moved
farthest from their decoded value are re-encoded with `encode(buffer, mask)`; the buffer then decays towards the
decoded weight by `delta_decay`. `mode: ste` is plain straight-through estimation: every code follows its buffer.

Training runs through `accelerate`: under `accelerate launch --num_processes N` each process takes 1/N of every
batch and gradients are averaged across processes, so the result matches one process with the same batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from compress.errors import CompressError, NumericError
from compress.formats.base import QuantizedLinear
from compress.registry import register_stage
from compress.solvers.pv import largest_changes, next_token_nll, teacher_topk, topk_kl
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


class PvTuningConfig(StageConfig):
    mode: Literal["pv", "ste"] = Field("pv", description="pv: P- and V-steps; ste: every code follows its buffer")
    steps: int = Field(64, ge=1, le=10_000_000, description="optimiser steps")
    batch_size: int = Field(2, ge=1, le=4096, description="calibration windows per step (all processes together)")
    gradient_accumulation: int = Field(1, ge=1, le=4096, description="micro-batches per step")
    learning_rate: float = Field(1e-4, ge=0.0, description="Adam on scales, exponents, codebooks (P-step)")
    norm_learning_rate: float = Field(1e-4, ge=0.0, description="Adam on norms and biases; 0 keeps them")
    code_learning_rate: float = Field(3e-3, ge=0.0, description="Adam on the straight-through buffers (V-step)")
    code_update_fraction: float = Field(0.01, gt=0.0, le=1.0, description="weights re-encoded per step (pv mode)")
    delta_decay: float = Field(0.0, ge=0.0, le=1.0, description="pull of the buffer towards the decoded weight")
    top_k: int = Field(64, ge=1, le=4096, description="teacher tokens kept per position")
    validation_windows: int = Field(8, ge=1, description="calibration windows held out to pick the best step")
    eval_every: int = Field(16, ge=1, description="steps between validations")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the calibration batches drawn at each step")
    checkpoint_every: int = Field(
        16, ge=0, description="steps between checkpoints beside the output (0: none); a rerun resumes from the last"
    )
    teacher: str | None = Field(
        None,
        min_length=1,
        description="the teacher model (alias, directory, hub id); default: the recipe's model before its first stage."
        " Set it when the recipe starts from an already compressed checkpoint",
    )

    @model_validator(mode="after")
    def _ste_updates_every_code(self) -> PvTuningConfig:
        if self.mode == "ste" and self.code_update_fraction != 1.0:
            self.code_update_fraction = 1.0
        return self


def prepare(model: nn.Module, config: PvTuningConfig, context) -> None:
    """Record the original model's top-k next-token log-probabilities on the calibration windows."""
    if context.kind != "causal-lm":
        raise CompressError("pv_tuning distils next-token distributions; the model is not a causal language model")
    windows = context.calibration_windows
    if len(windows) <= config.validation_windows:
        raise CompressError(
            f"pv_tuning: data.calibration.num_samples ({len(windows)}) must exceed validation_windows "
            f"({config.validation_windows})"
        )
    teacher = model
    if config.teacher is not None:
        from compress.models import load_model

        teacher = load_model(config.teacher, trust_remote_code=context.recipe.model.trust_remote_code).model
    values, indices = [], []
    with torch.no_grad():
        for batch in tqdm(windows.split(4), desc="pv_tuning teacher", unit="batch", leave=False):
            logp, index = teacher_topk(teacher(input_ids=batch, use_cache=False).logits[:, :-1], config.top_k)
            values.append(logp)
            indices.append(index)
    context.teacher["pv_tuning"] = (torch.cat(values), torch.cat(indices))


@register_stage("pv_tuning", PvTuningConfig, needs_quantized=True, prepare=prepare)
def apply(model: nn.Module, config: PvTuningConfig, context) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise CompressError("pv_tuning: the model has no compressed layer; put a quantizing stage before it")
    teacher_logp, teacher_index = context.teacher["pv_tuning"]
    windows = context.calibration_windows
    held_out = len(windows) - config.validation_windows
    trainer = _Trainer(model, layers, config, accelerator)
    generator = torch.Generator().manual_seed(config.seed)
    validation = slice(held_out, len(windows))
    checkpoint = training_directory(context.recipe.export.out, "pv_tuning")
    fingerprint = _fingerprint(trainer, config, teacher_logp)
    resumed = trainer.resume(checkpoint, fingerprint, generator)
    if resumed is None:
        start, losses = 1, []
        history = [{"step": 0, **trainer.validate(windows[validation], teacher_logp[validation],
                                                   teacher_index[validation])}]  # fmt: skip
        best = (history[0], 0)
        best_state = trainer.snapshot()
    else:
        start, losses, history, best, best_state = resumed
        log.info("pv_tuning: resumed from the checkpoint of step %d in %s", start - 1, checkpoint)
    progress = tqdm(range(start, config.steps + 1), desc=f"pv_tuning ({config.mode})", unit="step",
                    initial=start - 1, total=config.steps, disable=not accelerator.is_main_process)  # fmt: skip
    for step in progress:
        chosen = torch.randperm(held_out, generator=generator)[: config.batch_size]
        loss = trainer.step(windows[chosen], teacher_logp[chosen], teacher_index[chosen])
        if not math.isfinite(loss):
            raise NumericError(f"pv_tuning: the loss became {loss} at step {step}; nothing was written")
        losses.append(loss)
        progress.set_postfix(kl=f"{loss:.4f}", best=f"{best[0]['kl']:.4f}@{best[1]}")
        if step % config.eval_every == 0 or step == config.steps:
            measured = trainer.validate(windows[validation], teacher_logp[validation], teacher_index[validation])
            history.append({"step": step, **measured})
            log.info("pv_tuning step %d: validation %s", step, measured)
            if measured["kl"] < best[0]["kl"]:
                best = (measured, step)
                best_state = trainer.snapshot()
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            meta = {"fingerprint": fingerprint, "step": step, "losses": losses, "history": history,
                    "best": [best[0], best[1]]}  # fmt: skip
            trainer.checkpoint(checkpoint, meta, best_state, generator)
    trainer.restore(best_state)
    trainer.finish()
    if accelerator.is_main_process:
        discard_state(checkpoint)
    context.metrics.update(
        {"mode": config.mode, "best_step": best[1], "validation": history, "train_kl": _every(losses, 10)}
    )
    del context.teacher["pv_tuning"]


class _Trainer:
    """The P- and V-steps over a model whose compressed layers are `layers`."""

    def __init__(self, model: nn.Module, layers: dict[str, QuantizedLinear], config: PvTuningConfig, accelerator):
        self.model, self.layers, self.config, self.accelerator = model, layers, config, accelerator
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        continuous = [p for layer in layers.values() for p in layer.continuous_parameters()]
        tuned = [p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)]
        tuned += [layer.bias for layer in layers.values() if layer.bias is not None]
        for parameter in continuous + tuned:
            parameter.requires_grad_(True)
        self.probes = {}
        for name, layer in layers.items():
            layer.cache_codes = True
            self.probes[name] = layer.attach_probe()
        groups = [{"params": continuous, "lr": config.learning_rate}]
        if tuned and config.norm_learning_rate > 0:
            groups.append({"params": tuned, "lr": config.norm_learning_rate})
        self.optimizer = torch.optim.Adam(groups)
        with torch.no_grad():
            self.buffers = {name: nn.Parameter(layer.dequantize().detach().clone()) for name, layer in layers.items()}
        self.code_optimizer = torch.optim.Adam(list(self.buffers.values()), lr=config.code_learning_rate)
        self.wrapped = accelerator.prepare_model(model)  # DistributedDataParallel when launched on several processes

    def _micro_batches(self, windows, logp, index):
        """This process's share of the batch, in `gradient_accumulation` pieces."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(windows) % (world * self.config.gradient_accumulation):
            raise CompressError(
                f"pv_tuning: batch_size {len(windows)} must be a multiple of processes x gradient_accumulation "
                f"({world} x {self.config.gradient_accumulation})"
            )
        mine = slice(rank, None, world)
        parts = self.config.gradient_accumulation
        return zip(windows[mine].chunk(parts), logp[mine].chunk(parts), index[mine].chunk(parts), strict=True)

    def step(self, windows: torch.Tensor, logp: torch.Tensor, index: torch.Tensor) -> float:
        self.model.train()
        device = self.accelerator.device
        micro = list(self._micro_batches(windows, logp, index))
        total = 0.0
        for position, (ids, teacher_logp, teacher_index) in enumerate(micro):
            last = position == len(micro) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped)
            with sync:
                logits = self.wrapped(input_ids=ids.to(device), use_cache=False).logits[:, :-1]
                loss = topk_kl(logits, teacher_logp.to(device), teacher_index.to(device)) / len(micro)
                self.accelerator.backward(loss)
            total += float(loss.detach())
        total = float(self.accelerator.reduce(torch.tensor(total, device=device), reduction="mean"))
        if self.config.learning_rate > 0 or self.config.norm_learning_rate > 0:
            self.optimizer.step()  # P-step
        self._code_step()  # V-step
        self.optimizer.zero_grad(set_to_none=True)
        for probe in self.probes.values():
            probe.grad = None
        return total

    @torch.no_grad()
    def _code_step(self) -> None:
        for name in self.layers:
            self.buffers[name].grad = self.probes[name].grad
        self.code_optimizer.step()
        self.code_optimizer.zero_grad(set_to_none=True)
        for name, layer in self.layers.items():
            buffer = self.buffers[name]
            mask = largest_changes(buffer, layer.dequantize(), self.config.code_update_fraction)
            layer.encode(buffer, mask)
            if self.config.delta_decay:
                buffer.mul_(1 - self.config.delta_decay).add_(layer.dequantize(), alpha=self.config.delta_decay)

    @torch.no_grad()
    def validate(self, windows: torch.Tensor, logp: torch.Tensor, index: torch.Tensor) -> dict[str, float]:
        """Top-k KL to the teacher and perplexity on the held-out calibration windows (every process alike)."""
        self.model.eval()
        kl, nll = [], []
        for ids, teacher_logp, teacher_index in zip(windows.split(4), logp.split(4), index.split(4), strict=True):
            logits = self.model(input_ids=ids, use_cache=False).logits
            kl.append(float(topk_kl(logits[:, :-1], teacher_logp, teacher_index)) * len(ids))
            nll.append(float(next_token_nll(logits, ids)) * len(ids))
        return {"kl": sum(kl) / len(windows), "perplexity": math.exp(sum(nll) / len(windows))}

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Everything training changes: codes and continuous parameters of the layers, norms, biases."""
        return {
            name: tensor
            for name, tensor in self.model.state_dict(keep_vars=True).items()
            if not name.endswith("weight_probe") and (tensor.requires_grad or name.endswith(("qweight", "qzeros")))
        }

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self._tensors().items()}

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        current = self._tensors()
        for name, tensor in state.items():
            current[name].copy_(tensor)

    def _state_tensors(self, best_state: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
        return {
            **{f"model.{k}": v for k, v in self.snapshot().items()},
            **{f"best.{k}": v for k, v in best_state.items()},
            **{f"buffer.{k}": v for k, v in self.buffers.items()},
            **optimizer_tensors("adam", self.optimizer),
            **optimizer_tensors("code_adam", self.code_optimizer),
            "generator": generator.get_state(),
        }

    def checkpoint(self, directory: Path, meta: dict, best_state: dict, generator: torch.Generator) -> None:
        if self.accelerator.is_main_process:
            save_state(directory, self._state_tensors(best_state, generator), meta)
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def resume(self, directory: Path, fingerprint: str, generator: torch.Generator):
        """Continue from a checkpoint of the same training (same start, settings and teacher), if there is one."""
        found = load_state(directory)
        if found is None:
            return None
        tensors, meta = found
        if meta.get("fingerprint") != fingerprint:
            log.warning("pv_tuning: ignoring the checkpoint in %s, made by another run", directory)
            return None
        self.restore({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        for name, buffer in self.buffers.items():
            buffer.copy_(tensors[f"buffer.{name}"])
        restore_optimizer("adam", self.optimizer, tensors)
        restore_optimizer("code_adam", self.code_optimizer, tensors)
        generator.set_state(tensors["generator"])
        best_state = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
        best = (meta["best"][0], meta["best"][1])
        return meta["step"] + 1, meta["losses"], meta["history"], best, best_state

    def finish(self) -> None:
        for layer in self.layers.values():
            layer.detach_probe()
            layer.cache_codes = False
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()


def _fingerprint(trainer: _Trainer, config: PvTuningConfig, teacher_logp: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: the settings, the starting model and the teacher."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    for name, tensor in sorted(trainer.snapshot().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(teacher_logp.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _every(values: list[float], stride: int) -> list[float]:
    return [round(v, 5) for v in values[::stride]]
