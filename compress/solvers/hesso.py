"""HESSO's math (Chen et al., 2024, "HESSO: towards automatic efficient and user friendly any neural network
training and pruning"), independent of any model: the schedule, the saliency of groups, and their selection.

Schedule: `warmup_steps` of plain training; then `periods` pruning periods of `steps_per_period` steps each; then
`recovery_steps`. At the first step of period p (0-based) the groups that bring the pruned share to
(p + 1) / periods of the target are selected, and over the period's S steps they shrink linearly to exactly zero:
after step k of the period they hold (S - k) / S of their value at its start, while every other group trains.
Pruned groups are held at zero from then on.

Saliency (higher is more important), each criterion normalised across all groups of a kind, then weighted:
- magnitude: ||w_g||;  average_magnitude: ||w_g|| / n_g (n_g entries in the group);
- cosine: cos(w_g, d_g) with d the optimizer's update direction: a group the update pushes towards zero is cheap
  to remove; mapped to [0, 1] as (1 + cos) / 2 before normalisation;
- taylor: |<w_g, g_g>| with g the (smoothed) gradient, the first-order change of the loss when w_g goes to zero;
- output: sqrt(mean_t ||x_g(t) W_g^T||^2), the root-mean-square change of the block's output projection (down,
  o, BERT's output dense) per calibration token when the group is zeroed, with W_g its columns of that layer and
  x_g(t) its inputs there. Data-aware and not zero at the start of a distillation from the model itself, where the
  gradient criteria are (an addition to the reference's four, in the spirit of its "loss change" probe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CRITERIA = ("magnitude", "average_magnitude", "cosine", "taylor", "output")


@dataclass(frozen=True)
class Schedule:
    warmup_steps: int
    periods: int
    steps_per_period: int
    recovery_steps: int

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.periods * self.steps_per_period + self.recovery_steps

    @property
    def pruning_ends(self) -> int:
        """The last step of the last period: from the end of this step on, every selected group is zero."""
        return self.warmup_steps + self.periods * self.steps_per_period

    def phase(self, step: int) -> tuple[int, int] | None:
        """`(period, k)` for a step (1-based) inside the pruning periods, k in 1..steps_per_period; else None."""
        offset = step - self.warmup_steps - 1
        if offset < 0 or step > self.pruning_ends:
            return None
        return offset // self.steps_per_period, offset % self.steps_per_period + 1


def shrink_factor(k: int, steps: int) -> float:
    """Multiplier of a shrinking group's values at step k (1..steps) of its period, so that after step k it holds
    (steps - k) / steps of its value at the period start: the product of these factors up to k. Exactly 0 at k =
    steps."""
    return (steps - k) / (steps - k + 1)


def cumulative_target(groups: int, sparsity: float, period: int, periods: int) -> int:
    """Groups pruned in total by the end of `period` (0-based): an equal share of the target per period."""
    return int(round(sparsity * groups * (period + 1) / periods))


def criteria(
    weights: torch.Tensor,
    gradient: torch.Tensor | None,
    direction: torch.Tensor | None,
    output: torch.Tensor | None = None,
) -> dict:
    """Raw criteria `{name: [G]}` of groups laid out as rows `[G, n]`; the gradient-based ones only when the
    gradient (or update direction) is known, `output` (from `output_change`) when it was measured."""
    norms = weights.norm(dim=1)
    found = {"magnitude": norms, "average_magnitude": norms / weights.shape[1]}
    if direction is not None:
        scale = (norms * direction.norm(dim=1)).clamp_min(1e-30)
        found["cosine"] = (1 + (weights * direction).sum(dim=1) / scale) / 2
    if gradient is not None:
        found["taylor"] = (weights * gradient).sum(dim=1).abs()
    if output is not None:
        found["output"] = output
    return found


def output_change(columns: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Criterion `output` `[G]`: sqrt(mean_t ||x_g(t) W_g^T||^2) = sqrt(trace(W_g C_g W_g^T)), from each group's
    columns of the output projection `columns` `[G, d, m]` (W_g) and the mean Gram matrix of its inputs there
    `gram` `[G, m, m]` (C_g = mean_t x_g(t)^T x_g(t)), both float32."""
    return torch.einsum("gdi,gij,gdj->g", columns, gram, columns).clamp_min(0).sqrt()


def saliency(raw: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of the criteria, each divided by its largest value across the groups (a criterion that is zero
    everywhere, e.g. gradients of a distillation loss at its minimum, contributes nothing)."""
    total = None
    for name, values in raw.items():
        weight = weights.get(name, 0.0)
        if weight == 0.0:
            continue
        term = weight * values / values.abs().max().clamp_min(1e-30)
        total = term if total is None else total + term
    if total is None:
        total = raw["magnitude"] / raw["magnitude"].max().clamp_min(1e-30)
    return total


def select(
    scores: torch.Tensor, owner: torch.Tensor, pruned: torch.Tensor, count: int, minimum_kept: int = 1
) -> torch.Tensor:
    """The `count` lowest-scoring groups not pruned yet (boolean `[N]`), never leaving a family (`owner[i]` is the
    family of group i) with fewer than `minimum_kept` groups: a block keeps at least one head and one channel.
    A group scored infinite is never chosen."""
    chosen = torch.zeros_like(pruned)
    if count <= 0:
        return chosen
    kept = torch.bincount(owner[~pruned], minlength=int(owner.max()) + 1).tolist()
    masked = scores.masked_fill(pruned, math.inf)
    order = torch.argsort(masked, stable=True).tolist()
    taken = 0
    for index in order:
        if taken == count or masked[index] == math.inf:
            break
        family = int(owner[index])
        if kept[family] > minimum_kept:
            chosen[index] = True
            kept[family] -= 1
            taken += 1
    return chosen


def round_kept(
    scores: torch.Tensor, owner: torch.Tensor, pruned: torch.Tensor, chosen: torch.Tensor, multiple: int
) -> torch.Tensor:
    """Adjust `chosen` so that each family keeps a multiple of `multiple` groups (the nearest to what `chosen`
    leaves, at least `multiple`, never un-pruning a group): e.g. MLP widths that a later quantizer's group size
    divides. A family with fewer than `multiple` groups left keeps them all."""
    if multiple <= 1:
        return chosen
    adjusted = chosen.clone()
    for family in owner.unique().tolist():
        members = owner == family
        free = int((members & ~pruned).sum())  # groups that may still be chosen or kept
        kept = free - int((members & chosen).sum())
        target = min(max(multiple, multiple * round(kept / multiple)), multiple * (free // multiple))
        if free < multiple:
            target = free
        candidates = torch.nonzero(members & ~pruned).squeeze(1)
        order = candidates[torch.argsort(scores[candidates], stable=True)]
        adjusted[candidates] = False
        adjusted[order[: free - target]] = True
    return adjusted


def corrected_scores(saliency_values: torch.Tensor, loss_increase: torch.Tensor) -> torch.Tensor:
    """CRIC: candidates' saliency plus the measured loss increase per group when their block's candidates are
    zeroed together, both normalised by their largest value: a group whose removal the loss feels is kept."""
    increase = loss_increase.clamp_min(0)
    return saliency_values / saliency_values.abs().max().clamp_min(1e-30) + increase / increase.max().clamp_min(1e-30)
