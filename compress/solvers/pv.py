"""PV-Tuning's math, independent of any model or format: the distillation loss against a teacher's top-k
next-token distribution, and the choice of which codes to re-encode."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's `k` most likely next tokens: log-probabilities (float16) and indices (int32), `[..., k]`."""
    values, indices = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return values.half(), indices.int()


def topk_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_index: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus one bucket holding the rest
    of the vocabulary: the exact KL of both distributions coarsened to k + 1 outcomes (a lower bound of the full
    KL, equal to it when the teacher's tail is negligible). Differentiable in `student_logits`."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    index = teacher_index.long()
    student_top = student.gather(-1, index)
    teacher_top = teacher_logp.float()
    teacher_tail = (1 - teacher_top.exp().sum(-1)).clamp_min(1e-12)
    student_tail = (1 - student_top.exp().sum(-1)).clamp_min(1e-12)
    top = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    tail = teacher_tail * (teacher_tail.log() - student_tail.log())
    return (top + tail).mean()


def next_token_nll(student_logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each window's next tokens."""
    return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def largest_changes(proposed: torch.Tensor, current: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Mask of the `fraction` of weights whose proposed value moved farthest from the current one (None: all)."""
    if fraction >= 1.0:
        return None
    change = (proposed - current).abs().flatten()
    count = max(1, int(round(fraction * change.numel())))
    mask = torch.zeros_like(change, dtype=torch.bool)
    mask[change.topk(count, sorted=False).indices] = True  # exactly `count`, ties broken by position
    return (mask & (change > 0)).reshape(proposed.shape)
