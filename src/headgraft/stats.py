"""Per-class feature statistics: counts, sums and a shared second moment, in float64.

They are additive (``merge``, or an all-reduce across ranks), small (``C*d + d*d`` numbers),
and enough for closed-form heads (shared-covariance LDA) and for data-free replay of old
classes (sampling pseudo-features from a Gaussian per class).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InputError
from .labels import LabelMap

FORMAT = "headgraft.ClassStats/1"


class ClassStats:
    """Additive per-class statistics of feature vectors.

    Attributes:
        labels: class names, one per row of ``counts``/``sums``.
        counts: int64 ``[C]`` examples per class.
        sums: float64 ``[C, d]`` per-class feature sums.
        second: float64 ``[d, d]`` sum of ``x x^T`` over all examples (uncentred).
    """

    def __init__(
        self,
        labels: Iterable[object],
        counts: torch.Tensor,
        sums: torch.Tensor,
        second: torch.Tensor,
    ) -> None:
        self.labels = LabelMap(labels).names
        self.counts = counts.to(torch.int64).cpu()
        self.sums = sums.to(torch.float64).cpu()
        self.second = second.to(torch.float64).cpu()
        c, d = self.sums.shape
        if self.counts.shape != (c,) or self.second.shape != (d, d) or len(self.labels) != c:
            raise InputError("inconsistent ClassStats shapes; the statistics file is damaged")

    @classmethod
    def empty(cls, labels: Sequence[object], dim: int) -> ClassStats:
        c = len(labels)
        return cls(labels, torch.zeros(c, dtype=torch.int64), torch.zeros(c, dim,
                   dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    @classmethod
    def from_features(
        cls, features: torch.Tensor, targets: torch.Tensor, labels: Sequence[object]
    ) -> ClassStats:
        """Statistics of ``features [N, d]`` whose classes are ``targets`` (indices into labels)."""
        s = cls.empty(labels, features.shape[1])
        s.update(features, targets)
        return s

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def update(self, features: torch.Tensor, targets: torch.Tensor) -> ClassStats:
        """Add a batch of features (``targets`` index ``labels``); returns self."""
        x = features.detach().to(torch.float64).cpu().flatten(1)
        t = torch.as_tensor(targets).to(torch.int64).cpu()
        if x.shape[1] != self.dim:
            raise InputError(f"features have size {x.shape[1]} but the statistics have "
                             f"{self.dim}; use features from the same model")
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= len(self.labels)):
            raise InputError("a target index is outside the statistics' labels")
        self.counts += torch.bincount(t, minlength=len(self.labels))
        self.sums.index_add_(0, t, x)
        self.second += x.T @ x
        return self

    def merge(self, other: ClassStats) -> ClassStats:
        """Statistics of both sets; labels are the union (this one's order first)."""
        if other.dim != self.dim:
            raise InputError(f"cannot merge statistics of feature size {self.dim} and "
                             f"{other.dim}; collect both from the same model")
        labels = self.labels + [c for c in other.labels if c not in self.labels]
        out = ClassStats.empty(labels, self.dim)
        for s in (self, other):
            idx = torch.tensor([labels.index(c) for c in s.labels], dtype=torch.int64)
            out.counts.index_add_(0, idx, s.counts)
            out.sums.index_add_(0, idx, s.sums)
            out.second += s.second
        return out

    def subset(self, labels: Sequence[str]) -> ClassStats:
        """Statistics of some classes only (the shared second moment is recomputed as the
        within-class part plus those classes' means, so it stays consistent)."""
        idx = [self.labels.index(c) for c in labels]
        cov = self.within_scatter()
        n, mu = self.counts[idx], self.means()[idx]
        second = cov * (n.sum() / max(self.total, 1)) + (mu.T * n.double()) @ mu
        return ClassStats(labels, n.clone(), self.sums[idx].clone(), second)

    def means(self) -> torch.Tensor:
        """float64 ``[C, d]`` class means (zeros for empty classes)."""
        return self.sums / self.counts.clamp_min(1).double()[:, None]

    def within_scatter(self) -> torch.Tensor:
        """Sum over examples of ``(x - mu_class)(x - mu_class)^T``."""
        mu = self.means()
        return self.second - (mu.T * self.counts.double()) @ mu

    def covariance(self, shrinkage: float = 0.0) -> torch.Tensor:
        """Pooled within-class covariance, shrunk towards ``trace/d * I`` by ``shrinkage``."""
        dof = max(self.total - int((self.counts > 0).sum()), 1)
        cov = self.within_scatter() / dof
        cov = (cov + cov.T) / 2
        if shrinkage:
            target = torch.eye(self.dim, dtype=cov.dtype) * (torch.trace(cov) / self.dim)
            cov = (1 - shrinkage) * cov + shrinkage * target
        return cov

    def log_prior(self) -> torch.Tensor:
        return torch.log(self.counts.double().clamp_min(1) / max(self.total, 1))

    def lda(self, shrinkage: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared-covariance LDA rows: ``w_c = S^-1 mu_c``,
        ``b_c = -mu_c S^-1 mu_c / 2 + log p_c``."""
        empty = [c for c, n in zip(self.labels, self.counts.tolist()) if n == 0]
        if empty:
            raise InputError(f"no examples of class(es) {', '.join(empty[:10])} in the "
                             "statistics; collect data for every class")
        cov = self.covariance(shrinkage)
        mu = self.means()
        w = torch.linalg.solve(cov, mu.T).T
        b = -0.5 * (w * mu).sum(1) + self.log_prior()
        return w, b

    def sample(
        self, per_class: int, labels: Sequence[str] | None = None, *,
        shrinkage: float = 0.1, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-features from ``N(mu_c, shared covariance)``: float32 ``[C*per_class, d]``
        and targets indexing ``labels`` (default: all of this object's labels)."""
        labels = list(labels) if labels is not None else self.labels
        idx = [self.labels.index(c) for c in labels]
        chol = torch.linalg.cholesky(self.covariance(shrinkage))
        z = torch.randn(len(idx) * per_class, self.dim, dtype=torch.float64, generator=generator)
        mu = self.means()[idx].repeat_interleave(per_class, 0)
        targets = torch.arange(len(idx)).repeat_interleave(per_class)
        return (mu + z @ chol.T).float(), targets

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "labels": self.labels, "dim": self.dim,
                "counts": self.counts.tolist()}

    def save(self, path: str | os.PathLike[str], *, force: bool = True) -> None:
        """Write a safetensors file (tensors plus JSON metadata), atomically."""
        from .io.atomic import atomic_path

        tensors = {"counts": self.counts, "sums": self.sums, "second": self.second}
        meta = {"format": FORMAT, "labels": json.dumps(self.labels)}
        with atomic_path(path, force=force) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClassStats:
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise InputError(f"statistics file {path} does not exist; make one with "
                             "`headgraft stats MODEL --data PATH -o FILE`")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path} is not a readable safetensors file ({e}); "
                             "re-create it with `headgraft stats`") from None
        if meta.get("format") != FORMAT or not {"counts", "sums", "second"} <= set(tensors):
            raise InputError(f"{path} is not a headgraft statistics file; make one with "
                             "`headgraft stats`")
        return cls(json.loads(meta["labels"]), tensors["counts"], tensors["sums"],
                   tensors["second"])

    @classmethod
    def collect(
        cls, model: torch.nn.Module, data: Any, *, labels: Sequence[object] | None = None,
        head: str | None = None, batch_size: int = 256,
    ) -> ClassStats:
        """Statistics of the head's inputs over ``data`` (labels as indices or names).

        Integer targets index ``labels`` (default: the model's label names); names are looked
        up among ``labels``, or, when ``labels`` is omitted, collected in order of appearance.
        """
        from .features import head_features
        from .heads import find_head
        from .labels import model_labels

        h = find_head(model, head)
        feats, raw, _ = head_features(model, data, [h.path], batch_size=batch_size)
        names = [str(x) for x in raw] if raw and isinstance(raw[0], str) else None
        if labels is None:
            if names is not None:
                labels = list(dict.fromkeys(names))
            else:
                labels = model_labels(model).names
                extra = max(raw) + 1 - len(labels)
                labels = labels + [str(len(labels) + i) for i in range(max(extra, 0))]
        lm = LabelMap(labels)
        targets = torch.tensor([lm.index(n) for n in names] if names is not None else raw)
        return cls.from_features(feats[h.path], targets, lm.names)

    def __repr__(self) -> str:
        return f"ClassStats(classes={len(self.labels)}, dim={self.dim}, total={self.total})"
