"""Phase 2's distillation to the original model (``coda-train --distill-weight``): a KL loss to its
full-cache predictions on every token that is not an answer, computed lean enough for 16 rows of
2,048 tokens on one GPU (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Distillation:
    """Phase 2's KL loss to the original model (``--distill-weight``)."""

    teacher: nn.Module
    weight: float


def distillation_loss(
    student_logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor, teacher: nn.Module
) -> torch.Tensor:
    """KL(teacher || student) per scored token, averaged over the scored tokens.

    The teacher's logits are kept as it returns them (bf16 under autocast) and turned into
    probabilities one row at a time, in the forward and again in the backward (``_TeacherKL``): a
    16 x 2,048-token batch would otherwise hold several float32 copies of sequence x vocabulary."""
    if not bool(scored.any()):
        return student_logits.new_zeros(())
    with torch.no_grad():
        rows = [teacher(input_ids=ids[r : r + 4], use_cache=False).logits for r in range(0, ids.shape[0], 4)]
    return _TeacherKL.apply(student_logits, torch.cat(rows), scored)


class _TeacherKL(torch.autograd.Function):
    """mean over scored tokens of sum_v p_t (log p_t - log p_s); its gradient in the student's
    logits is (p_s - p_t) / count at scored tokens, computed row by row."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        count = int(scored.sum())
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for row in range(student.shape[0]):
            if scored[row].any():
                mine = F.log_softmax(student[row, scored[row]].float(), dim=-1)
                theirs = F.log_softmax(teacher[row, scored[row]].float(), dim=-1)
                total += (theirs.exp() * (theirs - mine)).sum()
        ctx.save_for_backward(student, teacher, scored)
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        student, teacher, scored = ctx.saved_tensors
        out = torch.zeros_like(student)
        scale = grad / ctx.count
        for row in range(student.shape[0]):
            if scored[row].any():
                mine = F.softmax(student[row, scored[row]].float(), dim=-1)
                theirs = F.softmax(teacher[row, scored[row]].float(), dim=-1)
                out[row, scored[row]] = ((mine - theirs) * scale).to(out.dtype)
        return out, None, None
