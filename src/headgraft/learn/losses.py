"""Losses that keep old classes while new ones are learned.

``DistillationLoss`` is Learning without Forgetting's term (Li & Hoiem, 2016): the KL
divergence between the softened old-class outputs of a frozen teacher (the model as it was
before learning) and the student's logits for the same classes, times ``T**2`` so that its
gradient keeps the same size whatever the temperature. ``FeatureDistillationLoss`` keeps the
head's input close to the teacher's. Both are ordinary ``nn.Module``s for any training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's softened outputs, computed once and indexed per batch.

    ``probs`` is ``softmax(teacher / T)`` over the distilled classes and ``neg_entropy`` is
    ``sum(p log p)`` per example, so that the KL divergence of a batch is a single soft-label
    cross-entropy plus a constant: no teacher work is left for the training step.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    temperature: float

    def select(self, idx: torch.Tensor) -> SoftTargets:
        return SoftTargets(self.probs[idx], self.neg_entropy[idx], self.temperature)

    def to(self, device: torch.device | str) -> SoftTargets:
        return SoftTargets(self.probs.to(device), self.neg_entropy.to(device), self.temperature)

    def __len__(self) -> int:
        return len(self.probs)


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

    @torch.no_grad()
    def soft_targets(self, teacher_logits: torch.Tensor, num_old: int | None = None) -> SoftTargets:
        """Precompute the teacher's side for ``forward(student, soft=targets.select(idx))``.

        Worth it whenever the teacher's outputs are fixed per example (cached features, inputs
        without random augmentation): the step then costs one soft-label cross-entropy.
        """
        n = num_old if num_old is not None else self.num_old
        n = teacher_logits.shape[-1] if n is None else int(n)
        logp = F.log_softmax(teacher_logits[..., :n].float() / self.temperature, dim=-1)
        p = logp.exp()
        return SoftTargets(p, (p * logp).sum(-1), self.temperature)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        num_old: int | None = None,
        *,
        soft: SoftTargets | None = None,
    ) -> torch.Tensor:
        """The weighted distillation term for a batch (a scalar unless ``reduction='none'``).

        Pass the teacher's logits, or ``soft`` targets from :meth:`soft_targets`.
        """
        if soft is not None:
            if soft.temperature != self.temperature:
                raise InputError(
                    "the soft targets were made at another temperature; make "
                    "them with this loss's soft_targets()"
                )
            n = soft.probs.shape[-1]
            t = self.temperature
            z = student_logits[..., :n].float() / t
            if self.reduction == "none":
                ce = F.cross_entropy(z, soft.probs, reduction="none")
                return (self.alpha * t * t) * (ce + soft.neg_entropy)
            ce = F.cross_entropy(z, soft.probs)
            return (self.alpha * t * t) * (ce + soft.neg_entropy.mean())
        if teacher_logits is None:
            raise InputError("pass the teacher's logits or its soft targets (soft=)")
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


class _CrossEntropyDistill(torch.autograd.Function):
    """Cross-entropy and the distillation KL of one logits tensor, in one autograd node.

    Both softmaxes are computed once in the forward pass (their log-sum-exps recovered from the
    largest probability, so no second exponential pass), and the gradient is written out:
    ``softmax(z) - onehot`` plus ``alpha * T * (softmax(z_old / T) - p)`` on the old columns.
    The pair then costs about two passes over the logits more than cross-entropy alone.
    """

    @staticmethod
    def forward(ctx, z, y, probs, neg_entropy, temperature, alpha):  # noqa: ANN001, ANN205
        n = probs.shape[1]
        b = z.shape[0]
        sm = torch.softmax(z, dim=1)
        # log-sum-exp per row from the largest logit and the largest probability (same column)
        lse = z.amax(dim=1) - sm.amax(dim=1).log()
        ce = (lse.sum() - z.gather(1, y[:, None]).sum()) / b
        zt = z[:, :n] / temperature
        q = torch.softmax(zt, dim=1)
        lse_t = zt.amax(dim=1) - q.amax(dim=1).log()
        cross = (torch.dot(probs.reshape(-1), zt.reshape(-1)) - lse_t.sum()) / b
        kl = (neg_entropy.sum() / b - cross) * (alpha * temperature * temperature)
        ctx.save_for_backward(sm, q, probs, y)
        ctx.temperature, ctx.alpha = temperature, alpha
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce, g_kl):  # noqa: ANN001, ANN205
        sm, q, probs, y = ctx.saved_tensors
        b = sm.shape[0]
        grad = sm  # used once, so it becomes the gradient in place
        grad.scatter_add_(
            1, y[:, None], torch.full((b, 1), -1.0, dtype=grad.dtype, device=grad.device)
        )
        grad.mul_(g_ce / b)
        grad[:, : probs.shape[1]].add_(
            q - probs, alpha=float(g_kl) * ctx.alpha * ctx.temperature / b
        )
        return grad, None, None, None, None, None


def cross_entropy_with_distillation(
    logits: torch.Tensor,
    targets: torch.Tensor,
    soft: SoftTargets,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross_entropy(logits, targets), DistillationLoss(...)(logits, soft=soft))`` at once.

    The same two values as the separate losses (float32, mean over the batch), computed in a
    single pass with a hand-written gradient: the fast path for cached soft targets.
    """
    z = logits.float()
    return _CrossEntropyDistill.apply(
        z, targets, soft.probs.to(z), soft.neg_entropy.to(z), float(soft.temperature), float(alpha)
    )
