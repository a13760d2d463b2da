"""Losses that keep old classes while new ones are learned.

``DistillationLoss`` is Learning without Forgetting's term (Li & Hoiem, 2016): the KL
divergence between the softened old-class outputs of a frozen teacher (the model as it was
before learning) and the student's logits for the same classes, times ``T**2`` so that its
gradient keeps the same size whatever the temperature. ``FeatureDistillationLoss`` keeps the
head's input close to the teacher's. Both are ordinary ``nn.Module``s for any training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class DistillationLoss(nn.Module):
    """``alpha * T**2 * KL(softmax(teacher / T) || softmax(student[:, :num_old] / T))``.

    The teacher's logits cover the old classes only (a model before grafting has exactly
    those outputs), so ``num_old`` defaults to the teacher's width and the student's first
    ``num_old`` logits are compared with them: old rows come first in a grown head. Pass
    ``num_old`` (here or to ``forward``) to compare only part of a wider teacher, e.g. a
    grown teacher of which only the old columns are trusted. Computed in float32.

    Example:
        >>> loss_fn = DistillationLoss(temperature=2.0, alpha=1.0)
        >>> with torch.no_grad():
        ...     teacher_logits = teacher(x)          # [N, num_old]
        >>> loss = ce(student(x), y) + loss_fn(student(x), teacher_logits)

    Args:
        num_old: how many leading logits to distil (default: the teacher's width).
        temperature: softening temperature T (> 0); 2 is LwF's choice.
        alpha: weight of the term; 0 turns it off.
        reduction: ``batchmean`` (the KL per example, averaged) or ``none`` (per example).
    """

    def __init__(
        self,
        num_old: int | None = None,
        *,
        temperature: float = 2.0,
        alpha: float = 1.0,
        reduction: str = "batchmean",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise InputError(f"distillation temperature must be > 0, got {temperature}")
        if alpha < 0:
            raise InputError(f"distillation weight alpha must be >= 0, got {alpha}")
        if reduction not in ("batchmean", "none"):
            raise InputError(f"unknown reduction {reduction!r}; choose batchmean or none")
        self.num_old = num_old
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.reduction = reduction

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        num_old: int | None = None,
    ) -> torch.Tensor:
        """The weighted distillation term for a batch (a scalar unless ``reduction='none'``)."""
        n = num_old if num_old is not None else self.num_old
        n = teacher_logits.shape[-1] if n is None else int(n)
        if not 0 < n <= min(student_logits.shape[-1], teacher_logits.shape[-1]):
            raise InputError(
                f"cannot distil {n} old classes from a teacher with {teacher_logits.shape[-1]} "
                f"and a student with {student_logits.shape[-1]} outputs; pass num_old <= both"
            )
        t = self.temperature
        s = F.log_softmax(student_logits[..., :n].float() / t, dim=-1)
        p = F.log_softmax(teacher_logits[..., :n].detach().float() / t, dim=-1)
        kl = (p.exp() * (p - s)).sum(-1) * (t * t)
        if self.reduction == "none":
            return self.alpha * kl
        return self.alpha * kl.mean()

    def extra_repr(self) -> str:
        return f"num_old={self.num_old}, temperature={self.temperature}, alpha={self.alpha}"


class FeatureDistillationLoss(nn.Module):
    """Keeps the head's input features close to the teacher's: ``weight * distance``.

    Args:
        weight: weight of the term.
        kind: ``mse`` (mean squared difference) or ``cosine`` (1 - cosine similarity, which
            ignores the features' scale).
    """

    def __init__(self, weight: float = 1.0, *, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise InputError(f"unknown feature distillation kind {kind!r}; choose mse or cosine")
        if weight < 0:
            raise InputError(f"feature distillation weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.kind = kind

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = student.float().flatten(1), teacher.detach().float().flatten(1)
        if self.kind == "cosine":
            return self.weight * (1 - F.cosine_similarity(s, t, dim=1)).mean()
        return self.weight * F.mse_loss(s, t)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, kind={self.kind!r}"
