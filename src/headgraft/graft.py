"""Grow or shrink a trained head: old rows stay bit-identical, labels stay in step.

``add_classes`` appends rows (started by an initialiser from ``inits.INITS``, with a bias from
``inits.BIASES``); ``remove_classes`` drops rows; ``fuse`` and ``split`` convert losslessly
between one ordinary layer and a :class:`~headgraft.layers.SplitHead` whose old block is the
original layer (old logits bit-identical by construction).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from .errors import InputError, LabelError, UnsupportedHeadError
from .features import head_features
from .heads import (
    check_growable,
    find_head,
    get_module,
    head_kind,
    set_module,
    transplant_hooks,
    with_rows,
)
from .inits import BIASES, INITS, InitContext, NewRows
from .labels import LabelMap, model_labels, set_model_labels
from .layers import CosineLinear, SplitHead
from .stats import ClassStats

log = logging.getLogger("headgraft")

Layout = Literal["fused", "split"]
LAYOUTS = ("fused", "split")


# ----------------------------------------------------------------------------- row helpers


def leaf(module: nn.Module) -> nn.Module:
    """The original layer at the bottom of (possibly nested) split heads."""
    while isinstance(module, SplitHead):
        module = module.old
    return module


def full_rows(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All rows of a head as stored (fused view of split heads), detached."""
    if isinstance(module, SplitHead):
        ow, ob = full_rows(module.old)
        nw, nb = full_rows(module.new)
        return torch.cat([ow, nw]), (None if ob is None else torch.cat([ob, nb]))
    b = getattr(module, "bias", None)
    return module.weight.detach(), (None if b is None else b.detach())


def head_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a head module for features ``[N, d]`` (1x1-conv heads get ``[N, d, 1, 1]``)."""
    if head_kind(module).dim == 1:
        return module(x[:, :, None, None])[:, :, 0, 0]
    return module(x)


def head_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 logits of a head module for float32 features ``[N, d]``, without gradients."""
    w = leaf(module).weight
    with torch.no_grad():
        return head_forward(module, x.to(device=w.device, dtype=w.dtype)).float()


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise InputError(f"{what} contains NaN or Inf; fix the checkpoint (or the "
                         "initialiser's input) before grafting")


def _fused(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    new = with_rows(leaf(module), weight, bias)
    transplant_hooks(module, new)
    return new


# ----------------------------------------------------------------------------- examples


def _names_of(raw: Sequence[Any], labels: LabelMap) -> list[str]:
    """Example labels as names: strings are names, integers index the grown label map."""
    out = []
    for y in raw:
        if isinstance(y, str):
            if y not in labels:
                raise LabelError(f"the examples use label {y!r}, which is neither an old nor a "
                                 "new class; add it to the new labels or drop those examples")
            out.append(y)
        else:
            i = int(y)
            if not 0 <= i < len(labels):
                raise LabelError(f"example label index {i} is outside 0..{len(labels) - 1}; "
                                 "integer labels index the grown label list (old, then new)")
            out.append(labels[i])
    return out


def _group(feats: torch.Tensor, names: list[str], keep: Sequence[str]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n in keep:
            groups.setdefault(n, []).append(i)
    return {n: feats[idx] for n, idx in groups.items()}


# ----------------------------------------------------------------------------- add / remove


def add_classes(
    model: nn.Module,
    new_labels: Sequence[str],
    *,
    init: str = "auto",
    bias: str = "auto",
    examples: Any = None,
    stats: ClassStats | None = None,
    head: str | None = None,
    seed: int | None = None,
    layout: Layout = "fused",
    init_options: dict[str, Any] | None = None,
) -> nn.Module:
    """Grow the classification head of ``model`` by one row per new label, in place.

    Old rows and biases stay bit-identical; the new rows come from the initialiser ``init``
    and their bias from the policy ``bias``; label names (``config.id2label`` for Hugging Face
    models) grow in step. Device, dtype and ``requires_grad`` of the head are kept.

    Args:
        model: the trained classifier.
        new_labels: names of the classes to add (must not exist yet).
        init: a name from ``headgraft.INITS``; ``auto`` picks ``imprint`` with examples,
            ``stats`` with statistics, else ``random``.
        bias: a name from ``headgraft.BIASES``; ``auto`` keeps the initialiser's own bias if it
            makes one (``stats``, ``copy``), uses the policy it suggests (``balanced`` for
            ``imprint``) and ``mean`` otherwise.
        examples: ``(inputs, labels)`` or a DataLoader of new-class (and optionally old-class)
            examples; integer labels index the grown label list, strings are names.
        stats: class statistics of the head's inputs (for ``stats``, ``prior``, ``silent``).
        head: dotted path of the head; found automatically when omitted.
        seed: seed for the random parts of the initialisers.
        layout: ``fused`` (one ordinary layer, what checkpoints expect) or ``split`` (the
            original layer computes the old logits, bit-identical by construction).
        init_options: initialiser settings, e.g. ``{"distribution": "xavier_uniform"}``,
            ``{"source": "cat"}`` for ``copy``, ``{"resolve_old": True}`` for ``stats``.

    Returns:
        The model (the new head module when the model is the head itself).
    """
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    h = find_head(model, head)
    for p in h.paths:
        check_growable(get_module(model, p), p)
    old_map = model_labels(model, head)
    new_map = old_map.extend(new_labels)
    new_names = new_map.names[len(old_map):]
    if init == "auto":
        init = "imprint" if examples is not None else "stats" if stats is not None else "random"
    initialiser = INITS.get(init)
    if bias != "auto":
        BIASES.get(bias)
    options = dict(init_options or {})

    feats: dict[str, torch.Tensor] = {}
    names: list[str] = []
    if examples is not None:
        feats, raw, _ = head_features(model, examples, h.paths)
        names = _names_of(raw, new_map)

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    grown_heads: list[tuple[str, nn.Module, nn.Module]] = []
    for path in h.paths:
        module = get_module(model, path)
        base = leaf(module)
        w_old, b_old = full_rows(module)
        _check_finite(w_old, f"the head {path!r}")
        if b_old is not None:
            _check_finite(b_old, f"the bias of head {path!r}")
        w2 = w_old.float().reshape(w_old.shape[0], -1)
        ctx = InitContext(
            weight=w2,
            bias=None if b_old is None else b_old.float(),
            old_labels=old_map.names,
            new_labels=new_names,
            num_total=len(new_map),
            features=_group(feats[path], names, new_names) if path in feats else None,
            old_features=_group(feats[path], names, old_map.names) if path in feats else None,
            stats=stats,
            generator=generator,
            options=options,
            logits=lambda x, _m=module: head_logits(_m, x),
            cosine_scale=float(base.scale.detach()) if isinstance(base, CosineLinear) else None,
        )
        # an auxiliary head (GoogLeNet's aux1/aux2) does not run in eval mode, so it has no
        # features: it starts from the mean of its rows, with a bias that needs none
        aux = examples is not None and path not in feats
        if aux and (init == "imprint" or (init == "copy" and not options.get("source"))):
            rows = INITS.get("mean")(ctx)
        else:
            rows = initialiser(ctx)
        policy = "mean" if aux and bias in ("silent", "balanced") else bias
        new_bias = _bias_for(ctx, rows, policy, path, has_bias=b_old is not None)
        _check_finite(rows.weight, f"the new rows from init {init!r}")
        shape = (len(new_names), *w_old.shape[1:])
        w_new = rows.weight.reshape(shape).to(dtype=w_old.dtype, device=w_old.device)
        b_new = None if new_bias is None else new_bias.to(dtype=b_old.dtype, device=b_old.device)
        if rows.old_weight is not None:
            if layout == "split":
                raise InputError("resolve_old=True re-solves the old rows, which a split head "
                                 "keeps as they are; use layout='fused'")
            w_old = rows.old_weight.reshape(w_old.shape).to(w_old)
            if b_old is not None and rows.old_bias is not None:
                b_old = rows.old_bias.to(b_old)
        if layout == "split":
            block = with_rows(base, w_new, b_new)
            grown: nn.Module = SplitHead(module, block, dim=head_kind(base).dim)
        else:
            grown = with_rows(base, torch.cat([w_old, w_new]),
                              None if b_old is None else torch.cat([b_old, b_new]))
        log.info("grew %s from %d to %d classes with init=%s: %s", path or "<model>",
                 len(old_map), len(new_map), init, rows.report(w2))
        grown_heads.append((path, module, grown))
    # replace only once every head has grown, so an error leaves the model as it was
    result = model
    for path, module, grown in grown_heads:
        transplant_hooks(module, grown)
        if path == "":
            result = grown
        else:
            set_module(model, path, grown)
    set_model_labels(result, new_map)
    return result


def _bias_for(ctx: InitContext, rows: NewRows, bias: str, path: str,
              has_bias: bool) -> torch.Tensor | None:
    if not has_bias:
        if bias not in ("auto", "zero"):  # a policy that would set values it cannot store
            raise UnsupportedHeadError(
                f"head {path!r} has no bias, so bias policy {bias!r} cannot be applied; use "
                "bias='auto' (or a head with a bias)"
            )
        return None
    if bias == "auto":
        if rows.bias is not None:
            return rows.bias
        return BIASES.get(rows.bias_policy or "mean")(ctx, rows)
    return BIASES.get(bias)(ctx, rows)


def remove_classes(
    model: nn.Module, labels: Sequence[str], *, head: str | None = None
) -> nn.Module:
    """Drop the rows of ``labels`` (in place; the model is returned).

    Removing exactly the rows a split head added restores the original layer object;
    otherwise the remaining rows are copied bit-for-bit into one layer.
    """
    h = find_head(model, head)
    old_map = model_labels(model, head)
    new_map, keep = old_map.remove(labels)
    result = model
    for path in h.paths:
        module = get_module(model, path)
        if isinstance(module, SplitHead) and keep == list(range(module.old.weight.shape[0])):
            shrunk = module.old
            transplant_hooks(module, shrunk)
        else:
            w, b = full_rows(module)
            idx = torch.tensor(keep, device=w.device)
            shrunk = _fused(module, w.index_select(0, idx).clone(),
                            None if b is None else b.index_select(0, idx).clone())
        if path == "":
            result = shrunk
        else:
            set_module(model, path, shrunk)
    set_model_labels(result, new_map)
    return result


def fuse(model: nn.Module, *, head: str | None = None) -> nn.Module:
    """Turn split heads into one ordinary layer each (rows bit-identical); returns the model."""
    h = find_head(model, head)
    labels = model_labels(model, head)
    result = model
    for path in h.paths:
        module = get_module(model, path)
        if isinstance(module, SplitHead):
            fused = _fused(module, *full_rows(module))
            if path == "":
                result = fused
            else:
                set_module(model, path, fused)
    if result is not model:  # the model was the head: its label names move to the new layer
        set_model_labels(result, labels)
    return result


def split(model: nn.Module, at: int, *, head: str | None = None) -> nn.Module:
    """Turn the head into a split head whose old block holds rows ``[:at]``; returns the model.

    The inverse of :func:`fuse`: ``fuse(split(m, n))`` has the same rows bit for bit.
    """
    h = find_head(model, head)
    if not 0 < at < h.num_classes:
        raise InputError(f"split point {at} must be between 1 and {h.num_classes - 1}")
    labels = model_labels(model, head)
    result = model
    for path in h.paths:
        module = get_module(model, path)
        w, b = full_rows(module)
        base = leaf(module)
        old = with_rows(base, w[:at].clone(), None if b is None else b[:at].clone())
        new = with_rows(base, w[at:].clone(), None if b is None else b[at:].clone())
        grown = SplitHead(old, new, dim=head_kind(base).dim)
        transplant_hooks(module, grown)
        if path == "":
            result = grown
        else:
            set_module(model, path, grown)
    if result is not model:
        set_model_labels(result, labels)
    return result
