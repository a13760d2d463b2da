"""Optimizer state that follows a grown (or shrunk) head, so a training run can resume.

After grafting, the head's parameters are new tensors with more rows; an optimizer still holds
the old ones (and a saved optimizer state has moments of the old shape). ``grow_optimizer_state``
moves every per-element state tensor (SGD's ``momentum_buffer``, Adam/AdamW's ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``) onto the new rows: old rows keep their values bit for bit,
new rows start at zero, and step counts are left as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import AmbiguousHeadError, InputError
from ..graft import leaf
from ..heads import find_head, get_module
from ..layers import SplitHead


def _default_rows(n_old: int, n_new: int | None) -> list[int | None]:
    if n_new is None:
        raise InputError("the new row count is unknown; pass num_rows= (or the grafted model)")
    if n_new < n_old:
        raise InputError(
            f"the head shrank from {n_old} to {n_new} rows; pass rows= the old index of every "
            "kept row (e.g. [0, 2, 3]) so the right moments are kept"
        )
    return [*range(n_old), *([None] * (n_new - n_old))]


def _resize(v: torch.Tensor, rows: Sequence[int | None]) -> torch.Tensor:
    """Rows of ``v`` rearranged by ``rows`` (old index per new row, None -> zeros)."""
    bad = [r for r in rows if r is not None and not 0 <= r < v.shape[0]]
    if bad:
        raise InputError(f"rows= names old row {bad[0]}, but the state has {v.shape[0]} rows")
    out = v.new_zeros((len(rows), *v.shape[1:]))
    dst = [i for i, r in enumerate(rows) if r is not None]
    if dst:
        out[dst] = v[[r for r in rows if r is not None]]
    return out


def _move_state(state: Mapping[str, Any], rows: Sequence[int | None]) -> dict[str, Any]:
    return {
        k: _resize(v, rows) if isinstance(v, torch.Tensor) and v.dim() >= 1 else v
        for k, v in state.items()
    }


def grow_optimizer_state(
    optimizer_or_state_dict: torch.optim.Optimizer | Mapping[str, Any],
    model: nn.Module | None = None,
    *,
    head: str | None = None,
    params: Sequence[int] | None = None,
    rows: Sequence[int | None] | None = None,
    num_rows: int | None = None,
) -> Any:
    """Make optimizer state fit a grafted head: old rows keep their moments, new rows start at 0.

    Works for SGD (momentum), Adam and AdamW, and any optimizer whose per-parameter state
    tensors have the parameter's shape and start at zero. Step counts are kept.

    Args:
        optimizer_or_state_dict: a live optimizer (changed in place) or a saved
            ``optimizer.state_dict()`` (a new dict is returned).
        model: the model after grafting. Required for a live optimizer; for a state dict it
            tells which parameters are the head's (the optimizer must have been built from
            ``model.parameters()``) and the new row count.
        head: the head's module path, when it cannot be found automatically.
        params: for a state dict without a model, the ids of the head's parameters.
        rows: for each row of the new head, the old row it came from (None for a new row).
            Default: old rows first, new rows appended, as ``add_classes`` does; required when
            the head shrank (``remove_classes``).
        num_rows: the new row count, for a state dict without a model.

    Returns:
        The optimizer, or the new state dict.

    Example:
        >>> opt = torch.optim.Adam(model.parameters())  # ... trained for a while
        >>> hg.add_classes(model, ["fox"])
        >>> hg.grow_optimizer_state(opt, model)  # keep training
    """
    if isinstance(optimizer_or_state_dict, torch.optim.Optimizer):
        if model is None:
            raise InputError(
                "a live optimizer needs the grafted model: grow_optimizer_state(optimizer, model)"
            )
        return _grow_live(optimizer_or_state_dict, model, head, rows)
    if not (
        isinstance(optimizer_or_state_dict, Mapping)
        and {"state", "param_groups"} <= set(optimizer_or_state_dict)
    ):
        raise InputError(
            "expected an optimizer or its state_dict() (a dict with 'state' and 'param_groups')"
        )
    return _grow_state_dict(optimizer_or_state_dict, model, head, params, rows, num_rows)


def _head_parameters(model: nn.Module, head: str | None) -> tuple[list[nn.Parameter], list]:
    h = find_head(model, head)
    out: list[nn.Parameter] = []
    leaves = []
    for path in h.paths:
        module = get_module(model, path)
        leaves.append(leaf(module))
        for p in module.parameters():
            if all(p is not q for q in out):
                out.append(p)
    return out, leaves


def _grow_live(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    head: str | None,
    rows: Sequence[int | None] | None,
) -> torch.optim.Optimizer:
    head_params, leaves = _head_parameters(model, head)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    in_model = {id(p) for p in model.parameters()}
    stale = [
        (g, i, p)
        for g in opt.param_groups
        for i, p in enumerate(g["params"])
        if id(p) not in in_model
    ]
    added = []
    for new in (p for p in head_params if id(p) not in in_opt):
        match = next(
            (s for s in stale if s[2].dim() == new.dim() and s[2].shape[1:] == new.shape[1:]), None
        )
        if match is None:  # a split head's new block: it joins its old block's group
            added.append(new)
            continue
        stale.remove(match)
        group, i, old = match
        group["params"][i] = new
        r = rows if rows is not None else _default_rows(old.shape[0], new.shape[0])
        state = opt.state.pop(old, None)
        if state:
            opt.state[new] = _move_state(state, r)
    if added:
        anchors = {id(m.weight) for m in leaves}
        group = next(
            (g for g in opt.param_groups if any(id(p) in anchors for p in g["params"])),
            opt.param_groups[0],
        )
        group["params"].extend(added)
    return opt


def _grow_state_dict(
    sd: Mapping[str, Any],
    model: nn.Module | None,
    head: str | None,
    params: Sequence[int] | None,
    rows: Sequence[int | None] | None,
    num_rows: int | None,
) -> dict[str, Any]:
    flat = [pid for g in sd["param_groups"] for pid in g["params"]]
    if params is None:
        if model is None:
            raise InputError(
                "say which parameters are the head's: pass the grafted model "
                "(built like the one the optimizer trained) or params=[ids]"
            )
        head_params, _ = _head_parameters(model, head)
        if any(isinstance(get_module(model, p), SplitHead) for p in find_head(model, head).paths):
            raise InputError(
                "a saved optimizer state matches a fused head; call headgraft.fuse(model) first"
            )
        mparams = list(model.parameters())
        if len(mparams) != len(flat):
            raise InputError(
                f"the optimizer state has {len(flat)} parameters but the model has "
                f"{len(mparams)}; it was not built from model.parameters(): pass params=[ids] "
                "of the head's weight and bias"
            )
        pos = {id(p): i for i, p in enumerate(mparams)}
        params = [flat[pos[id(p)]] for p in head_params if p.dim() >= 1]
        if num_rows is None:
            num_rows = find_head(model, head).num_classes
    unknown = [p for p in params if p not in flat]
    if unknown:
        raise InputError(
            f"params= {unknown} are not in the optimizer state; its ids are "
            f"{flat[:10]}{' ...' if len(flat) > 10 else ''}"
        )
    state = dict(sd["state"])
    for pid in params:
        st = state.get(pid)
        if not st:
            continue  # no step taken yet: nothing to move
        first = next((v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
        if first is None:
            continue
        r = rows if rows is not None else _default_rows(first.shape[0], num_rows)
        state[pid] = _move_state(st, r)
    out = dict(sd)
    out["state"] = state
    out["param_groups"] = copy.deepcopy(list(sd["param_groups"]))
    return out


def head_param_ids(
    sd: Mapping[str, Any], shapes: Sequence[Sequence[int]], *, what: str = "the optimizer state"
) -> list[int]:
    """Ids of the parameters whose state has the given shapes (a head's weight, then bias).

    Used for optimizer states saved inside a checkpoint when no model is at hand. A bias shape
    that several parameters share is resolved by order (a layer's bias follows its weight).
    """
    flat = [pid for g in sd["param_groups"] for pid in g["params"]]
    state = sd["state"]

    def shape_of(pid: int) -> tuple[int, ...] | None:
        v = next(
            (
                v
                for v in (state.get(pid) or {}).values()
                if isinstance(v, torch.Tensor) and v.dim() >= 1
            ),
            None,
        )
        return None if v is None else tuple(v.shape)

    ids: list[int] = []
    for shape in shapes:
        matches = [p for p in flat if shape_of(p) == tuple(shape) and p not in ids]
        if len(matches) > 1 and ids:
            after = flat.index(ids[-1]) + 1
            if after < len(flat) and flat[after] in matches:
                matches = [flat[after]]
        if len(matches) > 1:
            raise AmbiguousHeadError(
                f"{what}: {len(matches)} parameters have state of shape {tuple(shape)}, so the "
                "head's cannot be told apart; graft with --arch/--weights (and --optimizer) so "
                "the parameter order is known"
            )
        ids.extend(matches)
    return ids
