"""Multi-label heads: one sigmoid per class, a decision threshold per class.

Grafting is the same :func:`headgraft.add_classes`: rows are independent sigmoid units, so
old rows that stay bit-identical give old-class *probabilities* that are bit-identical, and
the old classes' thresholds remain valid as they are. New classes get thresholds fitted on
held-out data (``fit_thresholds``); nothing else changes.

Thresholds are stored by label name (``{"cat": 0.41, ...}``), so they survive growing and
shrinking the head without bookkeeping: a new label simply has none until it is fitted (and
uses ``DEFAULT_THRESHOLD`` meanwhile), a removed label's entry is ignored. They live

* on the model, as ``model.headgraft_thresholds``;
* in a Hugging Face config, as ``config.headgraft_thresholds`` next to ``id2label`` (written by
  ``save_pretrained`` into ``config.json``), with ``config.problem_type`` set to
  ``"multi_label_classification"`` so the model's own loss is BCE;
* in a safetensors file's metadata, or an exported ONNX model's ``metadata_props``, as the
  JSON string under ``METADATA_KEY`` (see ``to_metadata`` / ``from_metadata``);
* or in a plain JSON file (``save_thresholds`` / ``load_thresholds``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, LabelError
from .features import forward, iter_batches, logits_of
from .heads import find_head
from .io.atomic import atomic_path
from .labels import LabelMap, model_labels

PROBLEM_TYPE = "multi_label_classification"
THRESHOLDS_ATTR = "headgraft_thresholds"
METADATA_KEY = "headgraft_thresholds"
DEFAULT_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- storage


def is_multilabel(model: nn.Module) -> bool:
    """True when the model is marked multi-label (HF ``problem_type``) or carries thresholds."""
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", None) == PROBLEM_TYPE:
        return True
    return _stored(model) is not None


def _stored(model: nn.Module) -> dict[str, float] | None:
    found = getattr(model, THRESHOLDS_ATTR, None)
    if found is None:
        found = getattr(getattr(model, "config", None), THRESHOLDS_ATTR, None)
    return None if found is None else {str(k): float(v) for k, v in dict(found).items()}


def _check_value(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise InputError(
            f"threshold {value} for {name!r} is outside (0, 1); thresholds are "
            "probabilities of the class's sigmoid"
        )
    return value


def mark_multilabel(model: nn.Module, thresholds: Mapping[str, float] | None = None) -> None:
    """Mark ``model`` as multi-label and store ``thresholds`` (by label name) on it."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "problem_type"):
        config.problem_type = PROBLEM_TYPE
    if thresholds is not None:
        set_thresholds(model, thresholds)
    elif _stored(model) is None:
        set_thresholds(model, {})


def set_thresholds(
    model: nn.Module, thresholds: Mapping[str, float], *, head: str | None = None
) -> None:
    """Store per-class thresholds (label name -> probability), merged over the stored ones.

    Names must be labels of the model; labels not mentioned keep their stored threshold.
    """
    labels = model_labels(model, head)
    unknown = [k for k in thresholds if k not in labels]
    if unknown:
        raise LabelError(
            f"thresholds for unknown label(s) {', '.join(map(repr, unknown))}; "
            f"the model's labels are: {', '.join(labels.names[:20])}"
        )
    merged = {
        **(_stored(model) or {}),
        **{str(k): _check_value(k, v) for k, v in thresholds.items()},
    }
    setattr(model, THRESHOLDS_ATTR, merged)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "id2label"):
        setattr(config, THRESHOLDS_ATTR, merged)


def thresholds(model: nn.Module, *, head: str | None = None) -> torch.Tensor:
    """Per-output thresholds in label order (``DEFAULT_THRESHOLD`` where none is stored)."""
    stored = _stored(model) or {}
    names = model_labels(model, head)
    return torch.tensor([stored.get(n, DEFAULT_THRESHOLD) for n in names], dtype=torch.float64)


def missing_thresholds(model: nn.Module, *, head: str | None = None) -> list[str]:
    """Labels with no fitted threshold yet (typically the classes just grafted)."""
    stored = _stored(model) or {}
    return [n for n in model_labels(model, head) if n not in stored]


def to_metadata(labels: Sequence[str], values: Sequence[float] | torch.Tensor) -> dict[str, str]:
    """Thresholds as safetensors/ONNX metadata: ``{METADATA_KEY: JSON {name: value}}``."""
    values = [float(v) for v in values]
    if len(values) != len(labels):
        raise InputError(f"{len(values)} thresholds for {len(labels)} labels; give one per label")
    return {METADATA_KEY: json.dumps(dict(zip(labels, values)))}


def from_metadata(metadata: Mapping[str, str] | None) -> dict[str, float] | None:
    """The thresholds stored by ``to_metadata`` (None when the metadata has none)."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        raw = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise InputError(
            f"metadata {METADATA_KEY!r} is not valid JSON; rewrite it with "
            "headgraft.multilabel.to_metadata"
        ) from None
    if not isinstance(raw, dict):
        raise InputError(f"metadata {METADATA_KEY!r} must be a JSON object of label -> value")
    return {str(k): _check_value(k, v) for k, v in raw.items()}


def save_thresholds(path: str | os.PathLike[str], model: nn.Module, *, force: bool = True) -> None:
    """Write ``{"labels": [...], "thresholds": {name: value}}`` as JSON, atomically."""
    labels = model_labels(model)
    doc = {"labels": labels.names, "thresholds": dict(zip(labels, thresholds(model).tolist()))}
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def load_thresholds(path: str | os.PathLike[str]) -> dict[str, float]:
    """The thresholds of a file written by ``save_thresholds``."""
    try:
        doc = json.loads(open(path, encoding="utf-8").read())
        raw = doc["thresholds"]
    except FileNotFoundError:
        raise InputError(f"thresholds file {path} does not exist; check the path") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(
            f"{path} is not a thresholds file (JSON with a 'thresholds' object); "
            "write it with headgraft.multilabel.save_thresholds"
        ) from None
    return {str(k): _check_value(k, v) for k, v in dict(raw).items()}


# ----------------------------------------------------------------------------- fitting


def _as_targets(targets: torch.Tensor, n: int) -> torch.Tensor:
    t = torch.as_tensor(targets)
    if t.dim() != 2 or t.shape[1] != n:
        raise InputError(
            f"multi-label targets must be [N, {n}] multi-hot, got "
            f"{list(t.shape)}; one column per class in label order"
        )
    return t.bool()


def f1_scores(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class F1 of boolean predictions ``[N, C]`` against multi-hot targets ``[N, C]``.

    A class with no positive and no predicted positive scores 1 (nothing to get wrong).
    """
    pred, targets = pred.bool(), targets.bool()
    tp = (pred & targets).sum(0).double()
    fp = (pred & ~targets).sum(0).double()
    fn = (~pred & targets).sum(0).double()
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(denom)).float()


def fit_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The per-class threshold that maximises that class's F1 on ``(probs, targets)``.

    Candidates are midpoints between consecutive distinct probabilities (plus the default),
    so the choice does not depend on a grid; ties go to the candidate nearest 0.5.
    """
    probs = torch.as_tensor(probs).double()
    targets = _as_targets(targets, probs.shape[1])
    out = []
    for c in range(probs.shape[1]):
        p, t = probs[:, c], targets[:, c]
        u = torch.unique(p)
        mids = (u[1:] + u[:-1]) / 2 if len(u) > 1 else u
        cand = torch.cat([mids, torch.tensor([DEFAULT_THRESHOLD], dtype=p.dtype)])
        cand = cand.clamp(1e-6, 1 - 1e-6)
        pred = p[:, None] >= cand[None, :]
        f1 = f1_scores(pred, t[:, None].expand_as(pred))
        best = f1.max()
        near = (cand - DEFAULT_THRESHOLD).abs().float()
        pick = torch.where(f1 >= best - 1e-12, near, torch.full_like(near, float("inf"))).argmin()
        out.append(float(cand[pick]))
    return torch.tensor(out)


def fit_missing_thresholds(
    model: nn.Module,
    data: Any,
    *,
    classes: Sequence[str] | None = None,
    head: str | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Fit thresholds for ``classes`` (default: those with none yet) on held-out data.

    ``data`` is ``(inputs, targets)`` or a DataLoader with multi-hot ``[N, C]`` targets in
    label order. Other classes keep their stored thresholds. Returns what was fitted.
    """
    labels = model_labels(model, head)
    names = missing_thresholds(model, head=head) if classes is None else list(classes)
    idx = [labels.index(n) for n in names]
    if not idx:
        return {}
    probs, targets = predict_proba(model, data, batch_size=batch_size)
    targets = _as_targets(targets, len(labels))
    fitted = fit_thresholds(probs[:, idx], targets[:, idx])
    result = dict(zip(names, fitted.tolist()))
    mark_multilabel(model)
    set_thresholds(model, result, head=head)
    return result


@torch.no_grad()
def predict_proba(
    model: nn.Module, data: Any, *, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid probabilities ``[N, C]`` of the model on ``data`` and the targets as given."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    probs, ys = [], []
    try:
        for x, y in iter_batches(data, batch_size):
            x = (
                x.to(device)
                if isinstance(x, torch.Tensor)
                else {k: v.to(device) for k, v in x.items()}
            )
            probs.append(torch.sigmoid(logits_of(forward(model, x)).float()).cpu())
            ys.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was)
    return torch.cat(probs), torch.cat(ys)


def predict(model: nn.Module, data: Any, *, batch_size: int = 256) -> torch.Tensor:
    """Boolean predictions ``[N, C]``: each class's probability against its own threshold."""
    probs, _ = predict_proba(model, data, batch_size=batch_size)
    return probs >= thresholds(model)[None, :]


# ----------------------------------------------------------------------------- grafting


def single_label_examples(
    inputs: torch.Tensor, targets: torch.Tensor, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot examples as ``(inputs, label index)`` pairs for ``add_classes(examples=...)``.

    An example positive for several of ``classes`` appears once per class; the initialisers
    that read examples (``imprint``, ``mean``) then see each class's positives.
    """
    t = torch.as_tensor(targets).bool()
    xs, ys = [], []
    for c in classes:
        rows = t[:, c].nonzero().flatten()
        if len(rows) == 0:
            raise InputError(
                f"no example is positive for class index {c}; give at least one "
                "positive example of every new class"
            )
        xs.append(inputs[rows])
        ys.append(torch.full((len(rows),), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- learning


class SigmoidDistillationLoss(nn.Module):
    """Distillation for sigmoid heads: binary cross-entropy of the student's old outputs
    against the teacher's probabilities, both at temperature ``T``, times ``T**2``.

    The softmax KL used for single-label heads would couple classes that a multi-label head
    keeps independent.
    """

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        n = teacher.shape[-1]
        target = torch.sigmoid(teacher.detach().float() / t)
        loss = F.binary_cross_entropy_with_logits(student[..., :n].float() / t, target)
        return loss * t * t


@dataclass
class MultiLabelConfig:
    """Settings of ``learn_multilabel`` (defaults suit a few hundred examples)."""

    epochs: int = 60
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 64
    freeze_old: bool = True
    distill: float = 1.0
    temperature: float = 2.0
    train: str = "head"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _new_class_bce(logits: torch.Tensor, targets: torch.Tensor, num_old: int) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(
        logits[:, num_old:].float(), targets[:, num_old:].float()
    )


def learn_multilabel(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    num_old: int,
    *,
    config: MultiLabelConfig | None = None,
    head: str | None = None,
) -> nn.Module:
    """Train the new outputs of a grafted multi-label model, keeping the old ones.

    The new columns learn from BCE on their multi-hot targets (old-class examples in ``data``
    are the new classes' negatives, so keep some). With ``freeze_old`` the old rows stay
    bit-identical (and so do the old probabilities when only the head trains); otherwise the
    old outputs are held by sigmoid distillation from a frozen copy of the model. Old
    thresholds are kept; fit the new ones afterwards with ``fit_missing_thresholds``.

    Args:
        model: a grafted model (``add_classes`` already applied).
        data: ``(inputs, targets)`` with multi-hot ``[N, C]`` targets in label order.
        num_old: number of classes before grafting.
        config: training settings.
        head: dotted path of the head; found automatically when omitted.

    Returns:
        The trained model (in eval mode).
    """
    from .learn import freeze_old_rows

    cfg = config or MultiLabelConfig()
    if cfg.train not in ("head", "all"):
        raise InputError(f"unknown train={cfg.train!r}; choose 'head' or 'all'")
    h = find_head(model, head)
    x, y = data
    y = _as_targets(y, h.num_classes).float()
    if not 0 < num_old < h.num_classes:
        raise InputError(f"num_old={num_old} must be between 1 and {h.num_classes - 1}")
    teacher = None if cfg.freeze_old and cfg.train == "head" else copy.deepcopy(model).eval()
    kd = SigmoidDistillationLoss(cfg.temperature)
    head_params = {id(p) for p in h.module.parameters()}
    params = [p for p in model.parameters() if cfg.train == "all" or id(p) in head_params]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in {id(q) for q in params})
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.freeze_old:
        freeze_old_rows(model, opt, num_old)
    g = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    model.train()
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                xb, yb = x[idx].to(device), y[idx].to(device)
                logits = logits_of(forward(model, xb))
                loss = _new_class_bce(logits, yb, num_old)
                if teacher is not None and cfg.distill > 0:
                    with torch.no_grad():
                        old = logits_of(forward(teacher, xb))[:, :num_old]
                    loss = loss + cfg.distill * kd(logits, old)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.eval()
    return model


def labels_and_thresholds(model: nn.Module) -> tuple[LabelMap, torch.Tensor]:
    """The model's labels and thresholds in label order (for reports and exports)."""
    return model_labels(model), thresholds(model)
