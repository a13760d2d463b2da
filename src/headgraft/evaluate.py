"""Prove it: accuracy on old and new classes, forgetting, confusion and calibration.

``evaluate(model, data, old_labels=..., new_labels=...)`` runs the model over labelled data and
returns an :class:`EvalReport`: accuracy on old classes, new classes and all, their harmonic
mean, the share of old-class examples predicted as a new class (the usual failure after
adding classes), per-class accuracy, forgetting against the model before grafting, expected
calibration error and the confusion matrix. ``to_dict()`` gives plain JSON data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InputError, LabelError
from .features import forward, iter_batches, logits_of, to_device
from .heads import find_head
from .labels import LabelMap, model_labels
from .layers import SplitHead


@dataclass
class EvalReport:
    """Metrics of one model on one labelled data set (accuracies are fractions in 0..1).

    Attributes:
        old_accuracy: accuracy on examples of old classes (NaN when there are none).
        new_accuracy: accuracy on examples of new classes (NaN when there are none).
        all_accuracy: accuracy on every example.
        harmonic_mean: ``2 * old * new / (old + new)``, high only when both are.
        old_as_new: share of old-class examples predicted as some new class.
        per_class: class name -> accuracy (classes with examples only).
        support: class name -> number of examples.
        forgetting: mean over old classes of (reference accuracy - accuracy), or None.
        max_forgetting: the largest per-class drop, or None.
        reference_old_accuracy: the reference model's accuracy on old classes, or None.
        ece: expected calibration error of the top-class confidence (``bins`` equal bins).
        confusion: ``[true][predicted]`` counts, rows and columns in ``labels`` order.
        labels: the class names of the confusion matrix (old, then new).
        old_labels / new_labels: the two groups.
        num_examples: how many examples were scored.
    """

    old_accuracy: float
    new_accuracy: float
    all_accuracy: float
    harmonic_mean: float
    old_as_new: float
    per_class: dict[str, float]
    support: dict[str, int]
    ece: float
    confusion: list[list[int]]
    labels: list[str]
    old_labels: list[str]
    new_labels: list[str]
    num_examples: int
    forgetting: float | None = None
    max_forgetting: float | None = None
    reference_old_accuracy: float | None = None
    reference_per_class: dict[str, float] | None = None
    bins: int = 15
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (NaN becomes None)."""
        return _clean(asdict(self))

    def summary(self) -> dict[str, Any]:
        """The headline numbers only."""
        keys = (
            "old_accuracy",
            "new_accuracy",
            "all_accuracy",
            "harmonic_mean",
            "old_as_new",
            "forgetting",
            "ece",
            "num_examples",
        )
        return {k: _clean(getattr(self, k)) for k in keys}


def _clean(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _split_labels(
    model: nn.Module,
    names: list[str],
    old_labels: Sequence[str] | None,
    new_labels: Sequence[str] | None,
    reference: Any,
    head: str | None,
) -> tuple[list[str], list[str]]:
    if old_labels is not None:
        old = [str(c) for c in old_labels]
        new = (
            [str(c) for c in new_labels]
            if new_labels is not None
            else [c for c in names if c not in old]
        )
    elif new_labels is not None:
        new = [str(c) for c in new_labels]
        old = [c for c in names if c not in new]
    elif isinstance(reference, nn.Module):
        ref = model_labels(reference).names
        old = [c for c in names if c in ref]
        new = [c for c in names if c not in ref]
    else:
        h = find_head(model, head)
        if isinstance(h.module, SplitHead):
            old, new = names[: h.module.num_old], names[h.module.num_old :]
        else:
            old, new = list(names), []
    clash = sorted(set(old) & set(new))
    if clash:
        raise LabelError(
            f"class(es) {', '.join(clash)} are listed as both old and new; give "
            "each class to one group"
        )
    return old, new


@torch.no_grad()
def _predict(
    model: nn.Module, data: Any, batch_size: int, device: torch.device | None
) -> tuple[torch.Tensor, list[Any]]:
    was = model.training
    model.eval()
    first = next(iter(model.parameters()), None)
    dev = device or (first.device if first is not None else torch.device("cpu"))
    outs: list[torch.Tensor] = []
    raw: list[Any] = []
    try:
        for x, y in iter_batches(data, batch_size):
            outs.append(logits_of(forward(model, to_device(x, dev))).float().cpu())
            raw.extend(y.tolist() if isinstance(y, torch.Tensor) else list(y))
    finally:
        model.train(was)
    if not raw:
        raise InputError("the evaluation data is empty; pass labelled examples")
    return torch.cat(outs), raw


def _names(raw: list[Any], known: LabelMap) -> list[str]:
    """Class names of the data's labels; integers index ``known`` (old, then new classes)."""
    out = []
    for y in raw:
        if isinstance(y, str):
            if y not in known:
                raise LabelError(
                    f"the data has label {y!r}, which is neither an old nor a new "
                    "class; add the class first or drop those examples"
                )
            out.append(y)
        else:
            i = int(y)
            if not 0 <= i < len(known):
                raise LabelError(
                    f"label index {i} is outside the {len(known)} classes; "
                    "integer labels index the label list (old, then new)"
                )
            out.append(known[i])
    return out


def expected_calibration_error(probs: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE of top-class confidences: ``sum_b |acc_b - conf_b| * n_b / N`` over equal bins."""
    conf = probs.max(1).values
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            ece += float((correct[m].float().mean() - conf[m].mean()).abs()) * int(m.sum())
    return ece / max(len(conf), 1)


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    old_labels: Sequence[str] | None = None,
    new_labels: Sequence[str] | None = None,
    reference: nn.Module | EvalReport | dict[str, Any] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    head: str | None = None,
    bins: int = 15,
) -> EvalReport:
    """Score ``model`` on labelled ``data``, split into old and new classes.

    Args:
        model: the classifier (grown or not).
        data: ``(inputs, labels)`` tensors, a DataLoader or an iterable of batches; labels are
            class names or indices into the model's label list.
        old_labels: the classes the model had before grafting (default: the split head's old
            block, or the reference model's labels, or every class).
        new_labels: the added classes (default: the model's other classes).
        reference: the model before grafting (or its report) for forgetting.
        batch_size: examples per forward pass for tensor data.
        device: where to run (default: where the model is).
        head: dotted path of the head, when it cannot be found automatically.
        bins: bins of the expected calibration error.

    Returns:
        An :class:`EvalReport`.
    """
    names = model_labels(model, head).names
    old, new = _split_labels(model, names, old_labels, new_labels, reference, head)
    classes = LabelMap(old + new + [c for c in names if c not in old and c not in new])
    dev = torch.device(device) if isinstance(device, str) else device
    logits, raw = _predict(model, data, batch_size, dev)
    truth_names = _names(raw, classes)
    pred_names = [names[int(i)] for i in logits.argmax(1)]
    t = torch.tensor([classes.index(n) for n in truth_names])
    p = torch.tensor([classes.index(n) for n in pred_names])
    hit = p == t
    n_old = len(old)
    is_old = t < n_old
    is_new = (t >= n_old) & (t < n_old + len(new))
    pred_new = (p >= n_old) & (p < n_old + len(new))

    def acc(mask: torch.Tensor) -> float:
        return float(hit[mask].float().mean()) if mask.any() else float("nan")

    o, nw = acc(is_old), acc(is_new)
    hm = 2 * o * nw / (o + nw) if o == o and nw == nw and (o + nw) > 0 else float("nan")
    per_class: dict[str, float] = {}
    support: dict[str, int] = {}
    for i, c in enumerate(classes):
        m = t == i
        if m.any():
            per_class[c] = float(hit[m].float().mean())
            support[c] = int(m.sum())
    k = len(classes)
    conf = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
    report = EvalReport(
        old_accuracy=o,
        new_accuracy=nw,
        all_accuracy=float(hit.float().mean()),
        harmonic_mean=hm,
        old_as_new=float(pred_new[is_old].float().mean()) if is_old.any() else float("nan"),
        per_class=per_class,
        support=support,
        ece=expected_calibration_error(torch.softmax(logits, 1), hit, bins),
        confusion=conf.tolist(),
        labels=classes.names,
        old_labels=old,
        new_labels=new,
        num_examples=len(t),
        bins=bins,
    )
    if reference is not None:
        _add_forgetting(report, reference, data, old, batch_size, dev)
    return report


def _add_forgetting(
    report: EvalReport,
    reference: Any,
    data: Any,
    old: list[str],
    batch_size: int,
    device: torch.device | None,
) -> None:
    if isinstance(reference, nn.Module):
        ref_per = _ref_on_old(reference, data, old, batch_size, device)
    else:
        d = reference.to_dict() if isinstance(reference, EvalReport) else dict(reference)
        ref_per = d.get("per_class") or {}
    drops = {
        c: ref_per[c] - report.per_class[c] for c in old if c in ref_per and c in report.per_class
    }
    if drops:
        report.forgetting = sum(drops.values()) / len(drops)
        report.max_forgetting = max(drops.values())
        sup = {c: report.support[c] for c in drops}
        report.reference_old_accuracy = sum(ref_per[c] * sup[c] for c in drops) / sum(sup.values())
        report.reference_per_class = {c: ref_per[c] for c in drops}


def _ref_on_old(
    reference: nn.Module, data: Any, old: list[str], batch_size: int, device: torch.device | None
) -> dict[str, float]:
    """Per-class accuracy of the reference on the examples of the old classes only."""
    names = model_labels(reference).names
    logits, raw = _predict(reference, data, batch_size, device)
    pred = [names[int(i)] for i in logits.argmax(1)]
    hits: dict[str, list[int]] = {}
    for y, pr in zip(raw, pred):
        c = y if isinstance(y, str) else (names[int(y)] if 0 <= int(y) < len(names) else None)
        if c is None or c not in old:
            continue
        hits.setdefault(c, []).append(int(pr == c))
    return {c: sum(v) / len(v) for c, v in hits.items()}


def _make_callable() -> None:
    """Let ``headgraft.evaluate(model, data, ...)`` call :func:`evaluate` while the module
    stays importable as ``headgraft.evaluate`` (``from headgraft.evaluate import ...``)."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> EvalReport:
            return evaluate(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallableModule


_make_callable()
