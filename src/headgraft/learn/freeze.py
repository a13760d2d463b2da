"""Freeze the old rows of a grown head inside an existing optimizer.

Masking gradients is not enough to keep rows fixed: AdamW's decoupled weight decay shrinks
every parameter it holds, and momentum carries old updates forward. ``freeze_old_rows``
therefore does both: a gradient hook zeroes the old rows' gradients (so the optimizer state
learns nothing from them), and an optimizer step post-hook copies the saved rows back after
every step, so they stay bit-identical whatever the optimizer does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..heads import find_head, get_module, head_kind, is_head_module
from ..layers import SplitHead


class FrozenRows:
    """Handle returned by :func:`freeze_old_rows`: ``remove()`` undoes the freeze.

    Also a context manager (the freeze ends when the block exits). ``restore()`` copies the
    saved rows back by hand, for loops that step without the optimizer.
    """

    def __init__(self, pieces: list[tuple[nn.Parameter, int | None]], optimizer: Any) -> None:
        self._pieces = pieces  # (parameter, rows to keep; None = the whole tensor)
        self._saved = [
            p.detach().clone() if n is None else p.detach()[:n].clone() for p, n in pieces
        ]
        self._handles: list[Any] = []
        for p, n in pieces:
            if p.requires_grad:
                self._handles.append(p.register_hook(_masker(n)))
        if optimizer is not None:
            self._check_in(optimizer)
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore()))

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for p, _ in self._pieces]

    def _check_in(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p, _ in self._pieces):
            raise InputError(
                "the optimizer holds none of the head's parameters; pass the "
                "optimizer that trains this model's head"
            )

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved old rows back into the parameters."""
        for (p, n), saved in zip(self._pieces, self._saved):
            target = p if n is None else p[:n]
            target.copy_(saved)

    def remove(self) -> None:
        """Stop freezing (hooks removed; the rows keep their current values)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> FrozenRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _masker(n: int | None):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if n is None:
            return torch.zeros_like(grad)
        grad = grad.clone()
        grad[:n] = 0
        return grad

    return hook


def _head_modules(model_or_head: nn.Module, head: str | None) -> list[nn.Module]:
    if head is None and is_head_module(model_or_head):
        return [model_or_head]
    h = find_head(model_or_head, head)
    return [get_module(model_or_head, p) for p in h.paths]


def _pieces(module: nn.Module, num_old: int | None) -> list[tuple[nn.Parameter, int | None]]:
    if isinstance(module, SplitHead):
        if num_old is not None and num_old != module.num_old:
            raise InputError(
                f"num_old={num_old} but the split head's old block has "
                f"{module.num_old} rows; omit num_old for split heads"
            )
        return [(p, None) for p in module.old.parameters()]
    if num_old is None:
        raise InputError(
            "freeze_old_rows needs num_old for a fused head (the number of old "
            "classes, whose rows come first)"
        )
    rows = module.weight.shape[0]
    if not 0 < num_old <= rows:
        raise InputError(f"num_old={num_old} is outside 1..{rows}, the head's row count")
    out: list[tuple[nn.Parameter, int | None]] = [(module.weight, num_old)]
    if getattr(module, "bias", None) is not None:
        out.append((module.bias, num_old))
    # parameters every row shares (a cosine head's scale) change the old logits too
    out += [
        (getattr(module, name), None)
        for name in head_kind(module).shared
        if isinstance(getattr(module, name, None), nn.Parameter)
    ]
    return out


def freeze_old_rows(
    model_or_head: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    num_old: int | None = None,
    *,
    head: str | None = None,
) -> FrozenRows:
    """Keep the first ``num_old`` rows (and bias entries) of the head bit-identical.

    Works on a fused head (one ``nn.Linear``/1x1 conv/``CosineLinear`` with old rows first)
    or a split head (its whole ``old`` block), on the model or on the head module itself.
    The old rows' gradients are zeroed by a hook, and after every ``optimizer.step()`` they
    are copied back, which also undoes weight decay and momentum. Parameters shared by all
    rows (a cosine head's ``scale``) are kept too, since they move the old logits.

    Example:
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        >>> handle = freeze_old_rows(model, opt, num_old=7)
        >>> ...  # train as usual; handle.remove() to unfreeze

    Args:
        model_or_head: the model (its head is found as by ``find_head``) or the head module.
        optimizer: the optimizer that trains the head; ``None`` masks gradients only (then
            weight decay can still move the rows: call ``handle.restore()`` after steps).
        num_old: how many leading rows are old (default for split heads: the old block).
        head: dotted path of the head, when it cannot be found automatically.

    Returns:
        A :class:`FrozenRows` handle; ``handle.remove()`` ends the freeze.
    """
    pieces: list[tuple[nn.Parameter, int | None]] = []
    for module in _head_modules(model_or_head, head):
        pieces += _pieces(module, num_old)
    return FrozenRows(pieces, optimizer)


def freeze_parameters(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """``requires_grad_(False)`` on each parameter that was trainable; returns those."""
    changed = []
    for p in params:
        if p.requires_grad:
            p.requires_grad_(False)
            changed.append(p)
    return changed
