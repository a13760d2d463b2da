"""Labelled examples with random access, whatever shape the caller's data has.

Training needs to draw examples by index (class-balanced batches, a held-out slice,
exemplars, exact resumption), while callers hold ``(inputs, labels)`` tensors, a map-style
``Dataset``, a ``DataLoader`` or any iterable of batches (Hugging Face dict batches
included). :class:`Examples` gives all of them one interface: ``len``, ``labels`` and
``inputs(idx)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import InputError
from ..features import iter_batches

_LABEL_KEYS = ("labels", "label")


def _split_label(item: Any) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        key = next((k for k in _LABEL_KEYS if k in item), None)
        if key is None:
            raise InputError(
                "an example has no 'labels' key; add each example's class under 'labels'"
            )
        return {k: v for k, v in item.items() if k != key}, item[key]
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise InputError("each example must be (input, label) or a dict with 'labels'")


def _plain(y: Any) -> Any:
    if isinstance(y, torch.Tensor):
        return y.item()
    return y


def _trim(inputs: Any) -> Any:
    """Drop trailing padding columns that no example in the batch uses."""
    if not isinstance(inputs, Mapping) or "attention_mask" not in inputs:
        return inputs
    mask = inputs["attention_mask"]
    if mask.dim() != 2:
        return inputs
    used = torch.nonzero(mask.any(0)).flatten()
    length = int(used.max()) + 1 if len(used) else 1
    if length == mask.shape[1]:
        return inputs
    return {
        k: (
            v[:, :length]
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == mask.shape[1]
            else v
        )
        for k, v in inputs.items()
    }


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the last dimension to the longest part."""
    if len({p.shape[1:] for p in parts}) == 1:
        return torch.cat(parts)
    if len({p.dim() for p in parts}) != 1 or len({p.shape[1:-1] for p in parts}) != 1:
        raise InputError(
            "batches have inputs of different shapes that cannot be padded to "
            "one; resize the inputs to one shape"
        )
    width = max(p.shape[-1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts])


class Examples:
    """Indexable labelled examples: ``len(ex)``, ``ex.labels`` and ``ex.inputs(idx)``.

    Labels are kept as given (integers or names); inputs are tensors or dicts of tensors.
    """

    def __init__(self, labels: list[Any]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, idx: torch.Tensor) -> Any:
        raise NotImplementedError

    def subset(self, idx: torch.Tensor) -> Examples:
        return _Subset(self, torch.as_tensor(idx, dtype=torch.int64))

    @property
    def deterministic(self) -> bool:
        """True when the same index always gives the same input (no random transforms)."""
        return True

    @classmethod
    def of(cls, data: Any) -> Examples:
        """Wrap the caller's data (see the module docstring for the accepted shapes)."""
        if isinstance(data, Examples):
            return data
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and isinstance(data[0], (torch.Tensor, Mapping))
            and not isinstance(data[1], Mapping)
        ):
            x, y = data
            labels = y.tolist() if isinstance(y, torch.Tensor) else [_plain(v) for v in y]
            return TensorExamples(x, labels)
        if isinstance(data, DataLoader) and _map_style(data.dataset):
            return DatasetExamples(data.dataset, data.collate_fn)
        if isinstance(data, Dataset) and _map_style(data):
            return DatasetExamples(data, default_collate)
        names = getattr(data, "names", None)
        if isinstance(names, list) and hasattr(data, "__iter__") and len(names) == len(data):
            return LazyExamples(data)
        if isinstance(data, Mapping) or not isinstance(data, Iterable):
            raise InputError(
                f"cannot read examples from a {type(data).__name__}; pass "
                "(inputs, labels) tensors, a Dataset or a DataLoader"
            )
        return cls._materialise(data)

    @classmethod
    def _materialise(cls, data: Iterable) -> Examples:
        xs: list[Any] = []
        labels: list[Any] = []
        for x, y in iter_batches(data):
            xs.append(x)
            labels.extend(y.tolist() if isinstance(y, torch.Tensor) else [_plain(v) for v in y])
        if not xs:
            raise InputError("the data is empty; pass at least one example")
        if isinstance(xs[0], Mapping):
            keys = list(xs[0])
            x_all: Any = {
                k: _pad_cat([b[k] for b in xs]) for k in keys if isinstance(xs[0][k], torch.Tensor)
            }
        else:
            x_all = _pad_cat(list(xs))
        return TensorExamples(x_all, labels)


def _map_style(ds: Any) -> bool:
    return hasattr(ds, "__getitem__") and hasattr(ds, "__len__")


class LazyExamples(Examples):
    """A re-iterable batch source whose labels are known up front (``headgraft.data``'s
    ``DataSource``: ``names`` holds every example's label). It is streamed when the head's
    features are all that is needed (frozen regime) and read into memory only on the first
    random access (full fine-tuning)."""

    def __init__(self, source: Any) -> None:
        super().__init__(list(source.names))
        self.source = source
        self._materialised: Examples | None = None

    @property
    def materialised(self) -> bool:
        return self._materialised is not None

    def stream(self) -> Iterable[Any]:
        """Every example's inputs, batch by batch, in order."""
        for x, _ in iter_batches(self.source):
            yield x

    def inputs(self, idx: torch.Tensor) -> Any:
        if self._materialised is None:
            self._materialised = Examples._materialise(self.source)
        return self._materialised.inputs(idx)


class TensorExamples(Examples):
    """Inputs already in memory: one tensor, or a dict of tensors, with examples on dim 0."""

    def __init__(self, x: Any, labels: list[Any]) -> None:
        super().__init__(labels)
        n = len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)
        if n != len(labels):
            raise InputError(
                f"the data has {n} inputs but {len(labels)} labels; pass one label per input"
            )
        self.x = x

    def inputs(self, idx: torch.Tensor) -> Any:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        if isinstance(self.x, Mapping):
            return _trim({k: v[idx] for k, v in self.x.items()})
        return self.x[idx]


class DatasetExamples(Examples):
    """A map-style dataset, read item by item and collated with the loader's collate_fn."""

    def __init__(self, dataset: Any, collate_fn: Any) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        targets = getattr(dataset, "targets", None)
        if targets is not None and len(targets) == len(dataset):
            labels = [_plain(t) for t in targets]
        else:
            labels = [_plain(_split_label(dataset[i])[1]) for i in range(len(dataset))]
        super().__init__(labels)

    @property
    def deterministic(self) -> bool:
        # a dataset may apply random transforms; assume it does unless it says otherwise
        return bool(getattr(self.dataset, "deterministic", False))

    def inputs(self, idx: torch.Tensor) -> Any:
        items = [self.dataset[int(i)] for i in torch.as_tensor(idx).tolist()]
        batch = self.collate_fn(items)
        x, _ = _split_label(batch)
        return _trim(x)


class _Subset(Examples):
    def __init__(self, base: Examples, idx: torch.Tensor) -> None:
        super().__init__([base.labels[int(i)] for i in idx])
        self.base = base
        self.idx = idx

    @property
    def deterministic(self) -> bool:
        return self.base.deterministic

    def inputs(self, idx: torch.Tensor) -> Any:
        return self.base.inputs(self.idx[torch.as_tensor(idx, dtype=torch.int64)])


class Concat(Examples):
    """Several example sets one after the other."""

    def __init__(self, parts: Sequence[Examples]) -> None:
        parts = [p for p in parts if len(p)]
        super().__init__([y for p in parts for y in p.labels])
        self.parts = list(parts)
        self.offsets = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)

    @property
    def deterministic(self) -> bool:
        return all(p.deterministic for p in self.parts)

    def inputs(self, idx: torch.Tensor) -> Any:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        which = torch.bucketize(idx, self.offsets[1:].contiguous(), right=True)
        pieces = []
        order = []
        for k in torch.unique(which).tolist():
            sel = torch.nonzero(which == k).flatten()
            pieces.append(self.parts[k].inputs(idx[sel] - self.offsets[k]))
            order.append(sel)
        if len(pieces) == 1:
            return pieces[0]
        inv = torch.argsort(torch.cat(order))
        if isinstance(pieces[0], Mapping):
            keys = [k for k in pieces[0] if all(k in p for p in pieces)]
            return _trim({k: _pad_cat([p[k] for p in pieces])[inv] for k in keys})
        return _pad_cat(pieces)[inv]
