"""Head inputs (penultimate features) of a model, read with a forward pre-hook on the head."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .heads import get_module

_LABEL_KEYS = ("labels", "label")


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[tuple[Any, Any]]:
    """Yield ``(inputs, labels)`` from the shapes users have at hand.

    Accepts a pair ``(inputs, labels)`` of tensors (split into batches), a DataLoader or any
    iterable of ``(x, y)`` batches, or of dict batches (Hugging Face style, with ``labels``).
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if len(x) != len(y):
            raise InputError(f"examples have {len(x)} inputs but {len(y)} labels; pass one "
                             "label per input")
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    if isinstance(data, Mapping):
        raise InputError("examples must be (inputs, labels) or an iterable of batches, not a "
                         "single dict; wrap it in a list or a DataLoader")
    if not isinstance(data, Iterable):
        raise InputError(f"examples of type {type(data).__name__} are not iterable; pass "
                         "(inputs, labels) tensors or a DataLoader")
    for batch in data:
        if isinstance(batch, Mapping):
            key = next((k for k in _LABEL_KEYS if k in batch), None)
            if key is None:
                raise InputError("a dict batch has no 'labels' key; add the class of every "
                                 "example under 'labels'")
            yield {k: v for k, v in batch.items() if k != key}, batch[key]
        elif isinstance(batch, Sequence) and len(batch) >= 2:
            yield batch[0], batch[1]
        else:
            raise InputError("each batch must be (inputs, labels) or a dict with 'labels'")


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def pool_features(x: torch.Tensor, inputs: Any) -> torch.Tensor:
    """One feature vector per example: pool a conv head's map, pick a sequence's last token."""
    if x.dim() == 4:  # [N, C, H, W] into a 1x1 conv head
        return x.mean(dim=(2, 3))
    if x.dim() == 3:  # [N, T, d] into a per-token head whose logits are pooled at the end
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mask is not None:  # the last attended position, for left and right padding alike
            pos = torch.arange(mask.shape[1], device=mask.device)
            last = (pos * (mask != 0)).argmax(1)
            return x[torch.arange(len(x), device=x.device), last.to(x.device)]
        return x[:, -1]
    return x.flatten(1) if x.dim() > 2 else x


def forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a batch's inputs (keyword arguments for dict inputs)."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output (Hugging Face outputs, tuples, plain tensors)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"cannot read logits from a model output of type {type(output).__name__}")


@contextlib.contextmanager
def capture_inputs(model: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, list]]:
    """Record the input of each head module at ``paths`` while the block runs."""
    store: dict[str, list] = {p: [] for p in paths}
    handles = []
    for p in paths:
        def hook(_m, args, _p=p):
            store[_p].append(args[0].detach())
        handles.append(get_module(model, p).register_forward_pre_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def head_features(
    model: nn.Module,
    data: Any,
    paths: Sequence[str],
    *,
    batch_size: int = 256,
    with_logits: bool = False,
) -> tuple[dict[str, torch.Tensor], list, torch.Tensor | None]:
    """Features each head reads, for every example in ``data``, in eval mode.

    Returns ``({path: float32 [N, d]}, labels, logits)``: labels as given (ints or names),
    logits of the model output when ``with_logits`` (else None).
    """
    lookup = getattr(data, "cached_features", None)
    if callable(lookup) and not with_logits:  # a feature cache wraps the data (io/cache.py)
        def compute() -> dict[str, torch.Tensor]:  # iter(): the same batches, without the hook
            return head_features(model, iter(data), paths, batch_size=batch_size)[0]
        return lookup(model, paths, compute), list(data.names), None
    was_training = model.training
    model.eval()
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    labels: list = []
    outs: list[torch.Tensor] = []
    try:
        with capture_inputs(model, paths) as store:
            for inputs, y in iter_batches(data, batch_size):
                inputs = to_device(inputs, device)
                out = forward(model, inputs)
                if with_logits:
                    outs.append(logits_of(out).detach().float().cpu())
                for p in paths:  # auxiliary heads (GoogLeNet) do not run in eval mode
                    if store[p]:
                        feats[p].append(pool_features(store[p].pop(), inputs).float().cpu())
                        store[p].clear()
                labels.extend(y.tolist() if isinstance(y, torch.Tensor) else list(y))
    finally:
        model.train(was_training)
    if not labels:
        raise InputError("the examples are empty; pass at least one example per new class")
    return (
        {p: torch.cat(v) for p, v in feats.items() if v},
        labels,
        torch.cat(outs) if with_logits else None,
    )
