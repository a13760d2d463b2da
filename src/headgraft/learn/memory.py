"""Exemplar memory: a few stored examples per old class, and class-balanced batches.

The memory stores *indices* into the old data (plus each exemplar's label name and, when
known, where the data came from), not the inputs themselves, so it is a small JSON file.
Selection strategies are registered in ``SELECTIONS``: ``herding`` (iCaRL: examples whose
running mean best matches the class mean of the head's input features) and ``random``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..registry import Registry
from . import distributed as D

FORMAT = "headgraft.ExemplarMemory/1"

Selector = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
SELECTIONS: Registry[Selector] = Registry("exemplar selection")


@SELECTIONS.register(
    "herding",
    "iCaRL herding: greedily add the example that keeps the running mean of the chosen "
    "(L2-normalised) features closest to the class mean; needs features",
)
def _herding(features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(0)
    chosen: list[int] = []
    acc = torch.zeros_like(mu)
    taken = torch.zeros(len(f), dtype=torch.bool)
    for t in range(1, min(k, len(f)) + 1):
        dist = ((mu - (acc + f) / t) ** 2).sum(1)
        dist[taken] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        taken[i] = True
        acc += f[i]
    return torch.tensor(chosen, dtype=torch.int64)


@SELECTIONS.register("random", "k examples per class drawn uniformly without replacement")
def _random(features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(len(features), generator=generator)[:k]


class ExemplarMemory:
    """Up to ``per_class`` stored examples per class, chosen by a registered selection.

    Args:
        per_class: exemplars kept per class (k).
        selection: a name from ``SELECTIONS`` (``herding`` or ``random``).
        seed: seed of the random choices.

    Attributes:
        indices: int64 ``[M]`` positions of the exemplars in the data they were chosen from
            (in the order the data yields its examples).
        labels: the class name of each exemplar.
        source: where the data came from (a path), when known.

    Example:
        >>> memory = ExemplarMemory(per_class=20).build(model, (x_old, y_old))
        >>> memory.save("memory.json")
        >>> x_mem, y_mem = memory.take((x_old, y_old))
    """

    def __init__(self, per_class: int = 20, selection: str = "herding", seed: int = 0) -> None:
        if per_class < 1:
            raise InputError(f"exemplars per class must be >= 1, got {per_class}")
        SELECTIONS.get(selection)
        self.per_class = int(per_class)
        self.selection = selection
        self.seed = int(seed)
        self.indices = torch.zeros(0, dtype=torch.int64)
        self.labels: list[str] = []
        self.source: str | None = None

    # ------------------------------------------------------------------ choosing

    def select(
        self,
        features: torch.Tensor,
        targets: Sequence[Any] | torch.Tensor,
        *,
        label_names: Sequence[str] | None = None,
        indices: torch.Tensor | None = None,
        classes: Sequence[str] | None = None,
    ) -> ExemplarMemory:
        """Choose exemplars from ``features [N, d]`` of labelled examples; returns self.

        Under ``torchrun`` each rank passes its own shard (with global ``indices``); the
        shards are gathered, so every rank chooses the same exemplars.

        Args:
            features: the head's input features of the candidates (float).
            targets: class of each candidate: names, or indices into ``label_names``.
            label_names: names for integer targets (default: the integers as strings).
            indices: global position of each candidate (default ``0..N-1``).
            classes: keep exemplars of these classes only (default: every class seen).
        """
        names = _as_names(targets, label_names)
        if len(names) != len(features):
            raise InputError(
                f"{len(features)} feature rows but {len(names)} labels; pass one label per example"
            )
        idx = torch.arange(len(features)) if indices is None else torch.as_tensor(indices)
        if D.is_distributed():
            all_names = _gather_names(names)
            vocab = sorted(set(all_names))
            codes = torch.tensor([vocab.index(n) for n in names], dtype=torch.int64)
            features = D.all_gather_cat(features.float().cpu())
            codes = D.all_gather_cat(codes)
            idx = D.all_gather_cat(idx.to(torch.int64))
            names = [vocab[int(c)] for c in codes]
        order = torch.argsort(idx, stable=True)  # rank-independent order of candidates
        features, idx = features[order], idx[order]
        names = [names[int(i)] for i in order]
        wanted = list(dict.fromkeys(names)) if classes is None else [str(c) for c in classes]
        missing = [c for c in wanted if c not in set(names)]
        if missing:
            raise InputError(
                f"no examples of class(es) {', '.join(missing[:10])} to keep in "
                "the memory; pass data that contains every old class"
            )
        selector = SELECTIONS.get(self.selection)
        generator = torch.Generator().manual_seed(self.seed)
        keep_idx: list[torch.Tensor] = []
        keep_lab: list[str] = []
        for c in wanted:
            members = torch.tensor([i for i, n in enumerate(names) if n == c])
            local = selector(features[members].float(), self.per_class, generator)
            keep_idx.append(idx[members[local]])
            keep_lab += [c] * len(local)
        self.indices = torch.cat(keep_idx).to(torch.int64)
        self.labels = keep_lab
        return self

    def build(
        self,
        model: torch.nn.Module,
        data: Any,
        *,
        labels: Sequence[str] | None = None,
        head: str | None = None,
        classes: Sequence[str] | None = None,
        batch_size: int = 256,
    ) -> ExemplarMemory:
        """Choose exemplars from ``data`` using ``model``'s head-input features; returns self.

        ``labels`` names integer targets (default: the model's labels).
        """
        from ..features import head_features
        from ..heads import find_head
        from ..labels import model_labels

        h = find_head(model, head)
        feats, raw, _ = head_features(model, data, [h.path], batch_size=batch_size)
        names = labels if labels is not None else model_labels(model, head).names
        return self.select(feats[h.path], raw, label_names=names, classes=classes)

    # ------------------------------------------------------------------ using

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[str]:
        """The classes held, in first-seen order."""
        return list(dict.fromkeys(self.labels))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.labels:
            out[c] = out.get(c, 0) + 1
        return out

    def take(self, data: Any) -> tuple[Any, list[str]]:
        """The exemplars' inputs from the data they were chosen from, and their labels.

        ``data`` is ``(inputs, labels)`` tensors (inputs are indexed directly) or anything
        ``headgraft.learn`` accepts as examples (materialised once, then indexed).
        """
        from .data import Examples

        ex = Examples.of(data)
        if len(self.indices) and int(self.indices.max()) >= len(ex):
            raise InputError(
                f"the memory refers to example {int(self.indices.max())} but the "
                f"data has {len(ex)}; pass the data the memory was built from"
            )
        return ex.inputs(self.indices), list(self.labels)

    def batches(
        self,
        new_targets: Sequence[int] | torch.Tensor,
        memory_targets: Sequence[int] | torch.Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Class-balanced batches over ``[new examples..., exemplars...]`` (one epoch).

        Every batch holds both new-data and memory examples (slots split in proportion to
        their classes, at least one each), classes equally often within each part.
        """
        new_t = torch.as_tensor(new_targets, dtype=torch.int64)
        mem_t = torch.as_tensor(memory_targets, dtype=torch.int64)
        targets = torch.cat([new_t, mem_t])
        parts = [torch.arange(len(new_t)), len(new_t) + torch.arange(len(mem_t))]
        sampler = BalancedBatches(targets, batch_size, parts=[p for p in parts if len(p)])
        g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        yield from sampler.epoch(g)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "per_class": self.per_class,
            "selection": self.selection,
            "seed": self.seed,
            "source": self.source,
            "indices": self.indices.tolist(),
            "labels": list(self.labels),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExemplarMemory:
        if d.get("format") != FORMAT:
            raise InputError(
                "not a headgraft exemplar memory; make one with "
                "ExemplarMemory(...).build(model, data)"
            )
        m = cls(int(d["per_class"]), str(d["selection"]), int(d.get("seed", 0)))
        m.indices = torch.tensor(d["indices"], dtype=torch.int64)
        m.labels = [str(x) for x in d["labels"]]
        m.source = d.get("source")
        if len(m.indices) != len(m.labels):
            raise InputError(
                "the memory file has different numbers of indices and labels; rebuild it"
            )
        return m

    def save(self, path: str | os.PathLike[str], *, force: bool = True) -> None:
        """Write the memory as JSON, atomically."""
        from ..io.atomic import atomic_path

        with atomic_path(path, force=force) as tmp:
            tmp.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExemplarMemory:
        if not os.path.isfile(path):
            raise InputError(
                f"memory file {path} does not exist; build one with "
                "ExemplarMemory(...).build(model, data).save(path)"
            )
        try:
            d = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as e:
            raise InputError(f"{path} is not a readable memory file ({e}); rebuild it") from None
        return cls.from_dict(d)

    def __repr__(self) -> str:
        return (
            f"ExemplarMemory(per_class={self.per_class}, selection={self.selection!r}, "
            f"size={len(self)}, classes={len(self.classes)})"
        )


def _as_names(
    targets: Sequence[Any] | torch.Tensor, label_names: Sequence[str] | None
) -> list[str]:
    raw = targets.tolist() if isinstance(targets, torch.Tensor) else list(targets)
    out = []
    for y in raw:
        if isinstance(y, str):
            out.append(y)
        elif label_names is not None:
            if not 0 <= int(y) < len(label_names):
                raise InputError(
                    f"label index {int(y)} is outside the {len(label_names)} "
                    "label names; pass the names of every class"
                )
            out.append(str(label_names[int(y)]))
        else:
            out.append(str(int(y)))
    return out


def _gather_names(names: list[str]) -> list[str]:
    import torch.distributed as dist

    box: list[Any] = [None] * D.world_size()
    dist.all_gather_object(box, sorted(set(names)))
    return [n for part in box for n in part]


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63 - 1)


class BalancedBatches:
    """Class-balanced batches of indices into a pool of labelled examples.

    The pool can be cut into ``parts`` (e.g. new data and exemplar memory); each batch gives
    every part a share of its slots in proportion to the part's number of classes (at least
    one slot each), so every step sees every part. Within a part, classes come in shuffled
    rounds and each class's examples are drawn without replacement (reshuffled when used
    up), so classes appear equally often whatever their sizes.

    Args:
        targets: int64 class of every pool example.
        batch_size: examples per batch.
        parts: index sets that share the batch; default one part, the whole pool.
        steps: batches per epoch (default ``ceil(len(pool) / batch_size)``).
    """

    def __init__(
        self,
        targets: torch.Tensor,
        batch_size: int,
        *,
        parts: Sequence[torch.Tensor] | None = None,
        steps: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.batch_size = int(batch_size)
        self.parts = [
            torch.as_tensor(p, dtype=torch.int64)
            for p in (parts or [torch.arange(len(self.targets))])
            if len(p)
        ]
        if not self.parts:
            raise InputError("no examples to draw batches from; pass training data")
        if len(self.parts) > self.batch_size:
            raise InputError(
                f"batch size {batch_size} is too small to hold every part; use >= {len(self.parts)}"
            )
        self.steps = steps or -(-len(self.targets) // self.batch_size)
        self._classes = [self._by_class(p) for p in self.parts]
        slots = [len(c) for c in self._classes]
        total = sum(slots)
        share = [max(1, round(self.batch_size * s / total)) for s in slots]
        while sum(share) > self.batch_size:
            share[share.index(max(share))] -= 1
        while sum(share) < self.batch_size:
            share[share.index(min(share))] += 1
        self.share = share

    def _by_class(self, part: torch.Tensor) -> list[torch.Tensor]:
        t = self.targets[part]
        return [part[t == c] for c in torch.unique(t).tolist()]

    def __len__(self) -> int:
        return self.steps

    def epoch(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One epoch of batches, reproducible from the generator's state."""
        streams = [_Stream(classes, generator) for classes in self._classes]
        for _ in range(self.steps):
            yield torch.cat([s.take(k) for s, k in zip(streams, self.share)])


class _Stream:
    """Endless class-balanced draws from one part of the pool."""

    def __init__(self, classes: list[torch.Tensor], generator: torch.Generator) -> None:
        self.classes = classes
        self.g = generator
        self.order: list[int] = []
        self.queues: list[list[int]] = [[] for _ in classes]

    def _next_class(self) -> int:
        if not self.order:
            self.order = torch.randperm(len(self.classes), generator=self.g).tolist()
        return self.order.pop()

    def _next_example(self, c: int) -> int:
        q = self.queues[c]
        if not q:
            members = self.classes[c]
            q.extend(members[torch.randperm(len(members), generator=self.g)].tolist())
        return q.pop()

    def take(self, k: int) -> torch.Tensor:
        return torch.tensor(
            [self._next_example(self._next_class()) for _ in range(k)], dtype=torch.int64
        )
