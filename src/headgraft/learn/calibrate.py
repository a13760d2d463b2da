"""Post-hoc corrections of the new rows, fitted after training, each registered by name.

After learning new classes from a data set where they dominate, the new logits tend to be
too large (old examples are predicted as new classes) or, with distillation, too small.
Every correction here changes the *new* rows only, so the old rows stay bit-identical:

* ``weight-align`` (Zhao et al., 2020): scale the new rows so their mean norm equals the
  old rows'; with ``clip`` the head's weights are also clipped at zero after every training
  step, as in the paper (only sensible for non-negative features such as ReLU outputs).
* ``bias`` (BiC, Wu et al., 2019): ``new logits -> a * z + b`` fitted on a held-out slice.
* ``temperature``: ``new logits -> z / T`` fitted on the held-out slice.
* ``auto``: each of the above and ``none``, chosen by balanced accuracy on the held-out slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..graft import full_rows, head_forward, leaf
from ..layers import CosineLinear, SplitHead
from ..registry import Registry


@dataclass
class CalibrationContext:
    """What a correction may use.

    Attributes:
        head: the trained head module (fused layer or split head).
        num_old: how many leading rows are old classes.
        features: float32 ``[N, d]`` held-out head inputs (may be empty).
        targets: int64 ``[N]`` their classes (indices into the grown label list).
        options: correction settings (``clip`` for weight aligning, ``steps``...).
    """

    head: nn.Module
    num_old: int
    features: torch.Tensor
    targets: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def has_old_and_new(self) -> bool:
        t = self.targets
        return bool(len(t)) and bool((t < self.num_old).any()) and bool((t >= self.num_old).any())

    def logits(self) -> torch.Tensor:
        w = leaf(self.head).weight
        with torch.no_grad():
            return head_forward(self.head, self.features.to(w.device, w.dtype)).float().cpu()


@dataclass
class Correction:
    """A fitted correction: new logits become ``scale * z + shift``."""

    name: str
    scale: float = 1.0
    shift: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "shift": self.shift, **self.details}

    def adjust(self, logits: torch.Tensor, num_old: int) -> torch.Tensor:
        """The corrected logits (for choosing without touching the head)."""
        out = logits.clone()
        out[:, num_old:] = out[:, num_old:] * self.scale + self.shift
        return out

    @torch.no_grad()
    def apply(self, head: nn.Module, num_old: int) -> None:
        """Write the correction into the head's new rows (old rows untouched)."""
        if self.scale == 1.0 and self.shift == 0.0:
            return
        for weight, bias, start in _new_blocks(head, num_old):
            if not isinstance(leaf(head), CosineLinear):
                weight[start:].mul_(self.scale)
            if bias is not None:
                bias[start:].mul_(
                    self.scale if not isinstance(leaf(head), CosineLinear) else 1.0
                ).add_(self.shift)


def _new_blocks(head: nn.Module, num_old: int) -> list[tuple[torch.Tensor, Any, int]]:
    if isinstance(head, SplitHead):
        if head.num_old != num_old:
            raise InputError(f"the split head has {head.num_old} old rows, not {num_old}")
        return [(head.new.weight, getattr(head.new, "bias", None), 0)]
    return [(head.weight, getattr(head, "bias", None), num_old)]


Calibration = Callable[[CalibrationContext], Correction]
CALIBRATIONS: Registry[Calibration] = Registry("calibration")


def balanced_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over the classes present of each class's accuracy."""
    if not len(targets):
        return float("nan")
    hit = (logits.argmax(1) == targets).float()
    classes = torch.unique(targets)
    return float(torch.stack([hit[targets == c].mean() for c in classes]).mean())


@CALIBRATIONS.register("none", "no correction: the head as trained")
def _none(ctx: CalibrationContext) -> Correction:
    return Correction("none")


@CALIBRATIONS.register(
    "weight-align",
    "scale the new rows to the old rows' mean norm (WA); clip=True also clips the head's "
    "weights at 0 after each training step (for non-negative features)",
)
def _weight_align(ctx: CalibrationContext) -> Correction:
    if isinstance(leaf(ctx.head), CosineLinear):
        return Correction("weight-align", details={"note": "cosine head: norms do not matter"})
    w, _ = full_rows(ctx.head)
    norms = w.float().flatten(1).norm(dim=1)
    old, new = norms[: ctx.num_old].mean(), norms[ctx.num_old :].mean()
    gamma = float(old / new.clamp_min(1e-12))
    return Correction("weight-align", scale=gamma, details={"gamma": gamma})


def _fit_affine(ctx: CalibrationContext, name: str, with_shift: bool) -> Correction:
    if not ctx.has_old_and_new:
        raise InputError(
            f"calibration {name!r} needs held-out examples of old and new "
            "classes; keep a held-out slice (holdout > 0) with old-class data "
            "(memory, statistics or old examples), or choose weight-align"
        )
    z = ctx.logits()
    y = ctx.targets
    has_bias = getattr(leaf(ctx.head), "bias", None) is not None
    cosine = isinstance(leaf(ctx.head), CosineLinear)
    fit_scale = not cosine
    fit_shift = with_shift and has_bias
    if not fit_scale and not fit_shift:
        return Correction(name, details={"note": "nothing to fit for this head"})
    counts = torch.bincount(y, minlength=z.shape[1]).float()
    weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    log_a = torch.zeros((), requires_grad=fit_scale)
    b = torch.zeros((), requires_grad=fit_shift)
    params = [p for p in (log_a, b) if p.requires_grad]
    opt = torch.optim.LBFGS(
        params, lr=0.5, max_iter=int(ctx.options.get("steps", 100)), line_search_fn="strong_wolfe"
    )
    n = ctx.num_old

    def closure() -> torch.Tensor:
        opt.zero_grad()
        adj = torch.cat([z[:, :n], z[:, n:] * log_a.exp() + b], 1)
        loss = F.cross_entropy(adj, y, weight=weight * len(weight) / weight.sum())
        loss.backward()
        return loss

    opt.step(closure)
    a, s = float(log_a.detach().exp()), float(b.detach())
    if not (torch.isfinite(torch.tensor([a, s])).all()):
        return Correction(name, details={"note": "the fit diverged; left unchanged"})
    return Correction(name, scale=a, shift=s)


@CALIBRATIONS.register(
    "bias",
    "BiC bias correction: new logits -> a*z + b, fitted (class-balanced cross-entropy) on "
    "the held-out slice",
)
def _bias(ctx: CalibrationContext) -> Correction:
    return _fit_affine(ctx, "bias", with_shift=True)


@CALIBRATIONS.register(
    "temperature",
    "new logits -> z / T with one temperature fitted on the held-out slice",
)
def _temperature(ctx: CalibrationContext) -> Correction:
    c = _fit_affine(ctx, "temperature", with_shift=False)
    c.details.setdefault("temperature", 1.0 / c.scale if c.scale else float("inf"))
    return c


AUTO_CANDIDATES = ("none", "weight-align", "bias", "temperature")


def _significant(base: torch.Tensor, other: torch.Tensor, y: torch.Tensor) -> bool:
    """Paired sign test: does ``other`` fix clearly more held-out examples than it breaks?

    Held-out slices are small (a few exemplars per old class), so a correction is adopted
    only when its gain is about two standard deviations above chance (McNemar's test).
    """
    b = int(((other == y) & (base != y)).sum())
    c = int(((other != y) & (base == y)).sum())
    return b - c >= max(2.0, 2.0 * math.sqrt(b + c))


@CALIBRATIONS.register(
    "auto",
    "try weight-align, bias and temperature against none on the held-out slice; keep the best "
    "balanced accuracy if its gain over none is significant (paired sign test), else none",
)
def _auto(ctx: CalibrationContext) -> Correction:
    if not ctx.has_old_and_new:
        return Correction(
            "none", details={"auto": "no held-out examples of old and new classes to choose with"}
        )
    z = ctx.logits()
    y = ctx.targets
    base_pred = z.argmax(1)
    scores: dict[str, float] = {"none": balanced_accuracy(z, y)}
    best = Correction("none")
    for name in AUTO_CANDIDATES[1:]:
        c = CALIBRATIONS.get(name)(ctx)
        adj = c.adjust(z, ctx.num_old)
        scores[name] = balanced_accuracy(adj, y)
        if scores[name] > scores[best.name] + 1e-9 and _significant(base_pred, adj.argmax(1), y):
            best = c
    best.details["auto_scores"] = scores
    return best


def calibrate(
    head: nn.Module,
    num_old: int,
    features: torch.Tensor,
    targets: torch.Tensor,
    method: str = "auto",
    **options: Any,
) -> Correction:
    """Fit the correction ``method`` on held-out features and write it into the head.

    Args:
        head: the trained head module (old rows first).
        num_old: number of old rows.
        features: float32 ``[N, d]`` held-out head inputs.
        targets: their classes (int64 indices into the grown label list).
        method: a name from ``CALIBRATIONS``.
        **options: settings for the correction (e.g. ``steps``).

    Returns:
        The correction that was applied (``to_dict()`` for reports).
    """
    ctx = CalibrationContext(
        head, num_old, features.float(), torch.as_tensor(targets).long(), options
    )
    correction = CALIBRATIONS.get(method)(ctx)
    correction.apply(head, num_old)
    return correction


def clip_nonnegative(head: nn.Module, start: int = 0) -> None:
    """WA's clipping step: clamp the head's weights from row ``start`` on at zero (in place)."""
    with torch.no_grad():
        if isinstance(head, SplitHead):
            head.new.weight.clamp_(min=0)
            if start < head.num_old:
                head.old.weight.clamp_(min=0)
        else:
            head.weight[start:].clamp_(min=0)
