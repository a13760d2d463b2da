"""The learning loop: train a grown head (and, if asked, the backbone) without forgetting.

``Learner(config).fit(model, data, ...)`` (or ``learn(model, data, ...)``) runs these steps,
each chosen by name from a registry in :mod:`headgraft.learn.strategies`:

1. labels: classes in the data that the model lacks are grafted (rows started from class
   statistics); classes the model already has are old unless named in ``new_labels``;
2. old-class knowledge: class statistics (``stats=``), an exemplar memory (``memory=`` or
   built from ``old_data=``), or only the data itself;
3. features: the head's inputs are computed once (frozen regime, statistics, herding);
4. head solve: optionally re-solve rows in closed form from old and new statistics;
5. training: class-balanced batches with replay (exemplars, or pseudo-features sampled from
   statistics), distillation from a frozen snapshot of the model as training starts, old
   rows or backbone frozen when asked; a checkpoint after every epoch, resumable exactly;
6. post-hoc correction of the new rows, fitted on a held-out slice.

Under ``torchrun`` the same call trains with DistributedDataParallel: features and
exemplar candidates are gathered, statistics summed, and rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HeadgraftError, InputError, LabelError, UnsupportedHeadError
from ..features import capture_inputs, forward, logits_of, pool_features, to_device
from ..graft import add_classes, head_forward
from ..heads import find_head, get_module, head_kind, set_module, transplant_hooks
from ..labels import model_labels, set_model_labels
from ..layers import SplitHead
from ..stats import ClassStats
from . import distributed as D
from .calibrate import CALIBRATIONS, calibrate, clip_nonnegative
from .data import Concat, Examples, LazyExamples
from .freeze import FrozenRows, freeze_old_rows
from .losses import (
    DistillationLoss,
    FeatureDistillationLoss,
    SoftTargets,
    cross_entropy_with_distillation,
)
from .memory import SELECTIONS, BalancedBatches, ExemplarMemory, _epoch_seed
from .strategies import (
    DISTILL_TARGETS,
    FREEZES,
    OPTIMIZERS,
    PRIORS,
    RECIPES,
    REGIMES,
    REPLAYS,
    SAMPLINGS,
    SCHEDULES,
    SOLVERS,
    SolveContext,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger("headgraft")

CHECKPOINT_FORMAT = "headgraft.learn-checkpoint/1"
CHECKPOINT_NAME = "last.pt"


@dataclass
class LearnConfig:
    """Settings of a learning run; every string option names a registered strategy.

    Attributes:
        regime: ``frozen`` (cached features, head only) or ``full`` (backbone trains too).
        solve: ``auto``, ``none``, ``stats`` (re-solve all rows from statistics) or
            ``stats-new``; ``auto`` re-solves everything when old-class statistics (or a
            memory) are available and old rows are not frozen, else keeps the rows.
        replay: ``auto``, ``none``, ``exemplars`` or ``stats`` (pseudo-features).
        freeze: comma-separated ``backbone``, ``old-rows``, or ``nothing``/``auto``.
        alpha: weight of the distillation term (0 turns it off).
        temperature: distillation temperature T (the term is scaled by T**2).
        distill_on: ``auto``, ``old`` (LwF) or ``all`` logits of the start-of-training model.
        feature_distill: weight of the head-input feature distillation (0: off).
        epochs: training epochs (0: only solve and calibrate); None: 0 after a closed-form
            solve of the whole head with a frozen backbone and no exemplars (training on
            pseudo-features measured no better than the solve), else 10.
        batch_size: examples per step (over all ranks).
        lr: learning rate of the head.
        backbone_lr: the backbone's learning rate as a multiple of ``lr`` (full regime).
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        optimizer: ``adamw`` or ``sgd``.
        schedule: ``cosine`` or ``constant`` learning rate.
        sampling: ``auto``, ``balanced`` or ``shuffle`` batches.
        memory_per_class: exemplars per old class when a memory is built from ``old_data``.
        memory_selection: ``herding`` or ``random``.
        calibrate: post-hoc correction: ``auto``, ``none``, ``weight-align``, ``bias``,
            ``temperature``.
        wa_clip: clip head weights at 0 after each step (weight aligning's clipping step).
        holdout: share of each class held out for calibration (only when calibrating).
        shrinkage: covariance shrinkage of closed-form solves and pseudo-features (None: OAS).
        prior: ``uniform`` or ``counts`` class prior of closed-form solves.
        seed: seed of every random choice (batches, dropout, exemplars, pseudo-features).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        precision: ``auto``, ``32``, ``bf16`` or ``16`` (autocast of the full regime).
        cache_teacher: precompute the teacher's outputs once (None: when inputs are fixed).
        head: dotted path of the head when it cannot be found automatically.
    """

    regime: str = "frozen"
    solve: str = "auto"
    replay: str = "auto"
    freeze: str = "auto"
    alpha: float = 1.0
    temperature: float = 2.0
    distill_on: str = "auto"
    feature_distill: float = 0.0
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr: float = 0.1
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    sampling: str = "auto"
    memory_per_class: int = 20
    memory_selection: str = "herding"
    calibrate: str = "auto"
    wa_clip: bool = False
    holdout: float = 0.1
    shrinkage: float | None = None
    prior: str = "uniform"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    cache_teacher: bool | None = None
    head: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_recipe(cls, recipe: str = "auto", **overrides: Any) -> LearnConfig:
        """The settings of a registered recipe (``RECIPES``) with ``overrides`` on top."""
        _check_names(overrides)
        return cls(**{**RECIPES.get(recipe), **overrides}).validate()

    def validate(self) -> LearnConfig:
        """Check every name and number; returns self."""
        REGIMES.get(self.regime)
        if self.solve != "auto":
            SOLVERS.get(self.solve)
        REPLAYS.get(self.replay)
        for f in self.freezes:
            FREEZES.get(f)
        DISTILL_TARGETS.get(self.distill_on)
        SAMPLINGS.get(self.sampling)
        OPTIMIZERS.get(self.optimizer)
        SCHEDULES.get(self.schedule)
        SELECTIONS.get(self.memory_selection)
        CALIBRATIONS.get(self.calibrate)
        PRIORS.get(self.prior)
        resolve_device(self.device)
        checks = [
            (self.epochs is None or self.epochs >= 0, "epochs must be >= 0"),
            (self.batch_size >= 2, "batch_size must be >= 2"),
            (self.lr > 0, "lr must be > 0"),
            (self.backbone_lr >= 0, "backbone_lr must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.alpha >= 0, "alpha must be >= 0"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.feature_distill >= 0, "feature_distill must be >= 0"),
            (0 <= self.holdout < 0.9, "holdout must be in [0, 0.9)"),
            (self.memory_per_class >= 1, "memory_per_class must be >= 1"),
            (self.shrinkage is None or 0 <= self.shrinkage <= 1, "shrinkage must be in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(f"{msg}; fix the learn settings")
        return self

    @property
    def freezes(self) -> list[str]:
        return [f.strip() for f in str(self.freeze).split(",") if f.strip()] or ["auto"]


def _check_names(settings: dict[str, Any]) -> None:
    known = [f.name for f in fields(LearnConfig)]
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise InputError(
            f"unknown learn setting(s) {', '.join(unknown)}; choose from: {', '.join(known)}"
        )


@dataclass
class LearnResult:
    """What a learning run produced.

    Attributes:
        model: the trained model (the same object that was passed in, grown if needed).
        labels: every class name, old first.
        num_old: how many leading classes are old.
        config: the settings used.
        resolved: what each ``auto`` setting became.
        history: one dict per trained epoch (losses, seconds).
        solve: what the closed-form head solve did.
        correction: the post-hoc correction applied.
        memory: the exemplar memory used (or built), if any.
        before / after: evaluation reports on ``eval_data``, when given.
        seconds: wall-clock time by phase.
    """

    model: nn.Module
    labels: list[str]
    num_old: int
    config: dict[str, Any]
    resolved: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    solve: dict[str, Any] = field(default_factory=dict)
    correction: dict[str, Any] | None = None
    memory: ExemplarMemory | None = None
    before: Any = None
    after: Any = None
    seconds: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None

    @property
    def old_labels(self) -> list[str]:
        return self.labels[: self.num_old]

    @property
    def new_labels(self) -> list[str]:
        return self.labels[self.num_old :]

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "num_old": self.num_old,
            "config": self.config,
            "resolved": self.resolved,
            "history": self.history,
            "solve": self.solve,
            "correction": self.correction,
            "memory": None
            if self.memory is None
            else {
                "size": len(self.memory),
                "per_class": self.memory.per_class,
                "selection": self.memory.selection,
            },
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "seconds": self.seconds,
            "resumed_from": self.resumed_from,
        }


EpochCallback = Callable[[dict[str, Any]], None]


class Learner:
    """Learns new classes without forgetting old ones (see the module docstring).

    The constructor stores settings only; :meth:`fit` does the work and returns a
    :class:`LearnResult`.

    Args:
        config: the settings (default: the ``auto`` recipe).
        **overrides: settings replacing those of ``config``.
    """

    def __init__(self, config: LearnConfig | None = None, **overrides: Any) -> None:
        base = config.to_dict() if config is not None else {}
        _check_names(overrides)
        self.config = LearnConfig(**{**base, **overrides}).validate()

    def fit(
        self,
        model: nn.Module,
        data: Any,
        *,
        new_labels: Sequence[str] | None = None,
        stats: ClassStats | None = None,
        memory: ExemplarMemory | None = None,
        old_data: Any = None,
        eval_data: Any = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        progress: bool = False,
        callbacks: Sequence[EpochCallback] = (),
    ) -> LearnResult:
        """Learn the new classes of ``data`` into ``model`` (changed in place) and return it.

        Args:
            model: the trained classifier, grown already or not.
            data: labelled examples of the new classes (old-class examples may be mixed in):
                ``(inputs, labels)`` tensors, a Dataset, a DataLoader or batches; labels are
                names, or indices into the grown label list (old, then new).
            new_labels: which classes are new, when the model already has their rows.
            stats: ``ClassStats`` of the head's inputs for (at least) the old classes,
                collected with the model before grafting: enables the data-free paths.
            memory: exemplars of old classes, indexing ``old_data``.
            old_data: the old data the memory indexes; without ``memory``, a memory of
                ``memory_per_class`` examples per class is chosen from it.
            eval_data: labelled test data scored before and after (``result.before/after``).
            checkpoint_dir: write ``last.pt`` there after every epoch.
            resume: continue from ``checkpoint_dir/last.pt`` when it exists (same settings and
                data: the result is bit-for-bit that of an uninterrupted run).
            progress: show rich progress bars (rank 0 only).
            callbacks: called with each epoch's record after its checkpoint is written.
        """
        run = _Run(
            self.config,
            model,
            data,
            new_labels=new_labels,
            stats=stats,
            memory=memory,
            old_data=old_data,
            eval_data=eval_data,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
            callbacks=callbacks,
        )
        return run.execute()


def learn(
    model: nn.Module,
    data: Any,
    *,
    recipe: str = "auto",
    new_labels: Sequence[str] | None = None,
    stats: ClassStats | None = None,
    memory: ExemplarMemory | None = None,
    old_data: Any = None,
    eval_data: Any = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = False,
    callbacks: Sequence[EpochCallback] = (),
    **settings: Any,
) -> LearnResult:
    """Learn new classes into ``model`` without forgetting: a recipe plus settings.

    ``recipe`` is a name from ``headgraft.learn.RECIPES`` (``auto``, ``data-free``,
    ``replay``, ``lwf``, ``naive``, ...); ``settings`` are :class:`LearnConfig` fields that
    override it. The other arguments are those of :meth:`Learner.fit`.

    Example:
        >>> stats = ClassStats.collect(model, old_data)          # before grafting
        >>> result = learn(model, new_data, stats=stats)         # closed-form, data-free
        >>> result = learn(model, new_data, old_data=old_data, regime="full", recipe="replay")
    """
    config = LearnConfig.from_recipe(recipe, **settings)
    return Learner(config).fit(
        model,
        data,
        new_labels=new_labels,
        stats=stats,
        memory=memory,
        old_data=old_data,
        eval_data=eval_data,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        callbacks=callbacks,
    )


# ============================================================================ the run


class _Run:
    """One call of ``fit``: all state of the run, phase by phase."""

    def __init__(
        self,
        cfg: LearnConfig,
        model: nn.Module,
        data: Any,
        *,
        new_labels: Sequence[str] | None,
        stats: ClassStats | None,
        memory: ExemplarMemory | None,
        old_data: Any,
        eval_data: Any,
        checkpoint_dir: Any,
        resume: bool,
        progress: bool,
        callbacks: Sequence[EpochCallback],
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.data = data
        self.new_labels_arg = list(new_labels) if new_labels is not None else None
        self.stats_in = stats
        self.memory = memory
        self.old_data = old_data
        self.eval_data = eval_data
        self.ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = resume
        self.progress = progress
        self.callbacks = list(callbacks)
        self.resolved: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ driver

    def execute(self) -> LearnResult:
        t0 = time.perf_counter()
        device_type = resolve_device(self.cfg.device)
        owned = D.setup(device_type)
        try:
            self.device = D.local_device(device_type)
            if device_type == "cuda":
                torch.cuda.set_device(self.device)
            self.amp_dtype = resolve_precision(self.cfg.precision, device_type)
            self.resolved.update(
                device=str(self.device),
                precision=str(self.amp_dtype).replace("torch.", ""),
                world_size=D.world_size(),
            )
            home = _device_of(self.model)
            was_training = self.model.training
            before_model = copy.deepcopy(self.model) if self.eval_data is not None else None
            self.model.to(self.device)
            self._prepare()
            self.seconds["prepare"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            self._train()
            self.seconds["train"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            correction = self._calibrate()
            self.seconds["calibrate"] = time.perf_counter() - t2
            self.model.to(home)
            self.model.train(was_training)
            result = LearnResult(
                model=self.model,
                labels=self.labels.names,
                num_old=self.num_old,
                config=self.cfg.to_dict(),
                resolved=self.resolved,
                history=self.history,
                solve=self.solve_info,
                correction=correction,
                memory=self.memory,
                resumed_from=self.resumed_from,
            )
            if self.eval_data is not None:
                from ..evaluate import evaluate

                old, new = self.labels.names[: self.num_old], self.labels.names[self.num_old :]
                result.before = evaluate(
                    before_model, self.eval_data, old_labels=old, new_labels=new
                )
                result.after = evaluate(
                    self.model,
                    self.eval_data,
                    old_labels=old,
                    new_labels=new,
                    reference=before_model,
                )
            self.seconds["total"] = time.perf_counter() - t0
            result.seconds = dict(self.seconds)
            return result
        finally:
            D.teardown(owned)

    # ------------------------------------------------------------------ preparation

    def _prepare(self) -> None:
        cfg = self.cfg
        self.examples = Examples.of(self.data)
        if not len(self.examples):
            raise InputError("the training data is empty; pass examples of the new classes")
        self._resolve_labels()
        self.head_info = find_head(self.model, cfg.head)
        self.path = self.head_info.path
        if cfg.regime == "frozen" and len(self.head_info.paths) > 1:
            raise UnsupportedHeadError(
                f"the model has {len(self.head_info.paths)} heads that grow together; the "
                "frozen regime trains one head on cached features: use regime='full'"
            )
        self._prepare_memory()
        self._resolve_strategies()
        self._split_holdout()
        self._compute_features()
        self._graft_if_needed()
        self._solve()
        self._prepare_teacher()

    def _resolve_labels(self) -> None:
        old_map = model_labels(self.model, self.cfg.head)
        raw = self.examples.labels
        data_names = list(dict.fromkeys(y for y in raw if isinstance(y, str)))
        new = self.new_labels_arg
        if new is None:
            missing = [n for n in data_names if n not in old_map]
            beyond = [y for y in raw if not isinstance(y, str) and int(y) >= len(old_map)]
            if missing:
                new = missing
            elif beyond:
                raise InputError(
                    f"the data has label index {int(max(beyond))} but the model "
                    f"has {len(old_map)} classes; name the new classes with "
                    "new_labels=[...] (CLI: --new-labels a,b)"
                )
            else:
                module = find_head(self.model, self.cfg.head).module
                if isinstance(module, SplitHead):
                    new = old_map.names[module.num_old :]
                else:
                    raise InputError(
                        "every class of the data is already in the model, so "
                        "the new ones are unknown; pass new_labels=[...] (CLI: "
                        "--new-labels a,b)"
                    )
        new = [str(n) for n in new]
        if not new:
            raise LabelError("no new classes to learn; pass new_labels or data with new classes")
        present = [n for n in new if n in old_map]
        if present and len(present) != len(new):
            raise LabelError(
                f"classes {', '.join(present)} are in the model but "
                f"{', '.join(n for n in new if n not in old_map)} are not; graft "
                "all new classes first (headgraft add) or none of them"
            )
        if present:
            if old_map.names[-len(new) :] != new:
                raise LabelError(
                    f"the new classes {', '.join(new)} must be the model's last "
                    "rows (in that order); pass them as the model lists them"
                )
            self.num_old = len(old_map) - len(new)
            self.labels = old_map
            self.graft = False
        else:
            self.num_old = len(old_map)
            self.labels = old_map.extend(new)
            self.graft = True
        if self.num_old < 1:
            raise LabelError("the model has no old classes left; nothing to keep")
        self.targets = self._targets(raw, "the data")

    def _targets(self, raw: Sequence[Any], what: str) -> torch.Tensor:
        out = []
        n = len(self.labels)
        for y in raw:
            if isinstance(y, str):
                if y not in self.labels:
                    raise LabelError(
                        f"{what} has label {y!r}, which is neither an old nor a "
                        "new class; add it to new_labels or drop those examples"
                    )
                out.append(self.labels.index(y))
            else:
                i = int(y)
                if not 0 <= i < n:
                    raise LabelError(
                        f"{what} has label index {i}, outside 0..{n - 1}; integer "
                        "labels index the grown label list (old, then new)"
                    )
                out.append(i)
        return torch.tensor(out, dtype=torch.int64)

    def _prepare_memory(self) -> None:
        self.mem_examples: Examples | None = None
        self.mem_targets = torch.zeros(0, dtype=torch.int64)
        if self.memory is None and self.old_data is None:
            return
        if self.memory is not None and self.old_data is None:
            raise InputError(
                "the exemplar memory stores indices only; pass old_data= (CLI: "
                "--old-data) with the data it was built from"
            )
        old_ex = Examples.of(self.old_data)
        if self.memory is None:
            if self.cfg.replay not in ("auto", "exemplars"):
                return
            old_t = self._targets(old_ex.labels, "the old data")
            keep = torch.nonzero(old_t < self.num_old).flatten()
            herding = self.cfg.memory_selection == "herding"
            feats = (
                self._features(self.model, old_ex, keep) if herding else torch.zeros(len(keep), 1)
            )
            names = [self.labels[int(i)] for i in old_t[keep]]
            self.memory = ExemplarMemory(
                self.cfg.memory_per_class, self.cfg.memory_selection, self.cfg.seed
            ).select(feats, names, indices=keep)
            self.memory.source = getattr(self.old_data, "source", None)
            if herding:
                self.mem_features_cache = (keep, feats)
        if len(self.memory) and int(self.memory.indices.max()) >= len(old_ex):
            raise InputError(
                "the memory refers to examples beyond the old data; pass the old "
                "data the memory was built from"
            )
        self.mem_examples = old_ex.subset(self.memory.indices)
        self.mem_targets = self._targets(self.memory.labels, "the memory")
        if (self.mem_targets >= self.num_old).any():
            raise LabelError(
                "the memory holds examples of new classes; it should keep old classes only"
            )

    def _resolve_strategies(self) -> None:
        cfg = self.cfg
        has_mem = self.mem_examples is not None and len(self.mem_examples) > 0
        self.old_stats = self._old_stats_given()
        old_in_data = bool((self.targets < self.num_old).any())
        frozen = cfg.regime == "frozen"
        freezes = set(cfg.freezes)
        if "nothing" in freezes and len(freezes) > 1:
            raise InputError("freeze 'nothing' cannot be combined with other freezes")
        if cfg.solve == "auto":
            can = self.old_stats is not None or has_mem
            split = isinstance(self.head_info.module, SplitHead)
            keep_old = split or "old-rows" in freezes or self.head_info.kind == "cosine"
            solve = ("stats-new" if keep_old else "stats") if can else "none"
        else:
            solve = cfg.solve
        epochs = cfg.epochs
        if epochs is None:
            closed_form = solve == "stats" and (frozen or "backbone" in freezes)
            epochs = 0 if closed_form and not has_mem and cfg.replay in ("auto", "none") else 10
        self.epochs = epochs
        replay = cfg.replay
        if replay == "auto":
            if has_mem:
                replay = "exemplars"
            elif self.old_stats is not None and frozen and epochs > 0:
                replay = "stats"
            else:
                replay = "none"
        if replay == "exemplars" and not has_mem:
            raise InputError(
                "replay 'exemplars' needs an exemplar memory; pass memory= and "
                "old_data= (CLI: --memory/--old-data), or choose another replay"
            )
        if replay == "stats":
            if self.old_stats is None:
                raise InputError(
                    "replay 'stats' needs statistics of the old classes; pass "
                    "stats= (CLI: --stats FILE from `headgraft stats`)"
                )
            if not frozen and "backbone" not in freezes:
                raise InputError(
                    "replay 'stats' samples features of the backbone the "
                    "statistics were collected with, so the backbone must stay "
                    "frozen: use regime='frozen' or freeze='backbone'"
                )
        if "auto" in freezes:
            freezes = {"nothing"}
        old_features = replay != "none" or old_in_data
        if "old-rows" in freezes and not old_features and epochs > 0:
            raise InputError(
                "freezing the old rows while training on new classes alone collapses the old "
                "classes (nothing shows the new rows where they lie); add old-class features "
                "to the batches (stats= for replay 'stats', or an exemplar memory) or freeze "
                "nothing and rely on distillation"
            )
        distill_on = cfg.distill_on
        if distill_on == "auto":
            distill_on = "all" if solve == "stats" else "old"
        sampling = cfg.sampling
        if sampling == "auto":
            sampling = "balanced" if replay != "none" else "shuffle"
        self.solve_name = solve
        self.replay = replay
        self.freezes = freezes - {"nothing"}
        self.distill_on = distill_on
        self.sampling = sampling
        self.train_backbone = not frozen and "backbone" not in self.freezes
        self.resolved.update(
            epochs=epochs,
            solve=solve,
            replay=replay,
            freeze=",".join(sorted(freezes)),
            distill_on=distill_on,
            sampling=sampling,
            regime=cfg.regime,
        )

    def _old_stats_given(self) -> ClassStats | None:
        s = self.stats_in
        if s is None:
            return None
        old = self.labels.names[: self.num_old]
        missing = [c for c in old if c not in s.labels]
        if missing:
            raise InputError(
                f"the statistics lack old class(es) {', '.join(missing[:10])}; "
                "collect them with the model before grafting on all old data"
            )
        if s.dim != self.head_info.in_features:
            raise InputError(
                f"the statistics have feature size {s.dim} but the head reads "
                f"{self.head_info.in_features}; collect them from this model"
            )
        return s.subset(old)

    def _split_holdout(self) -> None:
        """Hold out a stratified share of every class (data and memory) for calibration."""
        g = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, -1))
        # a held-out slice is worth its cost only with real old-class examples to check the
        # balance between old and new classes (pseudo-features would flatter any choice)
        has_old = bool(len(self.mem_targets)) or bool((self.targets < self.num_old).any())
        share = self.cfg.holdout if self.cfg.calibrate != "none" and has_old else 0.0

        def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            train, hold = [], []
            for c in torch.unique(t).tolist():
                idx = torch.nonzero(t == c).flatten()
                idx = idx[torch.randperm(len(idx), generator=g)]
                k = int(round(share * len(idx))) if len(idx) >= 5 else 0
                hold.append(idx[:k])
                train.append(idx[k:])
            if not train:
                empty = torch.zeros(0, dtype=torch.int64)
                return empty, empty
            return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(hold)).values

        self.train_idx, self.hold_idx = split(self.targets)
        self.mem_train_idx, self.mem_hold_idx = split(self.mem_targets)

    def _needs_features(self) -> bool:
        return self.cfg.regime == "frozen" or self.solve_name != "none" or self.graft

    def _compute_features(self) -> None:
        """Head inputs of the training data and memory, once, with the current model."""
        self.feats: torch.Tensor | None = None
        self.mem_feats: torch.Tensor | None = None
        if not self._needs_features():
            return
        n = len(self.examples)
        if self.cfg.regime == "frozen" or not D.is_distributed():
            self.feats = self._cached_features(
                lambda: self._features(self.model, self.examples, torch.arange(n))
            )
        else:
            # full fine-tuning needs these features only for statistics: every rank keeps its
            # own shard, and the statistics are summed across ranks (one all-reduce)
            self.local_idx = torch.arange(n)[D.shard(n)]
            self.local_feats = self._features(
                self.model, self.examples, self.local_idx, gather=False
            )
        if self.mem_examples is not None and len(self.mem_examples):
            cache = getattr(self, "mem_features_cache", None)
            if cache is not None:
                keep, feats = cache
                pos = {int(k): i for i, k in enumerate(keep.tolist())}
                self.mem_feats = feats[[pos[int(i)] for i in self.memory.indices]]
            else:
                self.mem_feats = self._features(
                    self.model, self.mem_examples, torch.arange(len(self.mem_examples))
                )

    def _cached_features(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, or the same features from the data's feature cache
        (``headgraft.io.cache``): in the frozen regime a streamed source is read exactly as
        ``head_features`` reads it (same batches, no autocast), so the entries are shared."""
        source = getattr(self.examples, "source", None)
        lookup = getattr(source, "cached_features", None)
        if (
            not callable(lookup)
            or self.cfg.regime != "frozen"
            or getattr(self.examples, "materialised", True)
        ):
            return compute()
        return lookup(self.model, [self.path], lambda: {self.path: compute()})[self.path]

    @torch.no_grad()
    def _features(
        self, model: nn.Module, ex: Examples, idx: torch.Tensor, gather: bool = True
    ) -> torch.Tensor:
        """float32 head inputs of ``ex[idx]`` in eval mode (sharded over ranks and gathered;
        with ``gather=False`` this rank computes exactly ``idx`` and keeps them)."""
        path = find_head(model, self.cfg.head).path
        streamed = (
            isinstance(ex, LazyExamples)
            and not ex.materialised
            and torch.equal(idx, torch.arange(len(ex)))
        )
        local = idx if streamed or not gather else idx[D.shard(len(idx))]
        chunks = (
            ex.stream()
            if streamed
            else (ex.inputs(c) for c in local.split(max(self.cfg.batch_size, 256)))
        )
        was = model.training
        model.eval()
        out: list[torch.Tensor] = []
        try:
            with capture_inputs(model, [path]) as store, self._autocast():
                for x in chunks:
                    inputs = to_device(x, self.device)
                    forward(model, inputs)
                    out.append(pool_features(store[path].pop(), inputs).float().cpu())
                    store[path].clear()
        finally:
            model.train(was)
        d = self.head_info.in_features
        f = torch.cat(out) if out else torch.zeros(0, d)
        if streamed or not gather:  # every rank read the whole source / keeps its part
            return f
        return D.unshard(D.all_gather_cat(f), len(idx))

    def _new_stats(self) -> ClassStats:
        """Statistics of the training part of the data (all classes it has)."""
        names = self.labels.names
        if self.feats is not None:
            idx = self.train_idx
            return ClassStats.from_features(self.feats[idx], self.targets[idx], names)
        keep = torch.isin(self.local_idx, self.train_idx)
        local = ClassStats.from_features(
            self.local_feats[keep], self.targets[self.local_idx[keep]], names
        )
        return D.all_reduce_stats(local)

    def _all_stats(self) -> ClassStats | None:
        """Old-class statistics (given, or from the memory) merged with the data's."""
        if self.feats is None and getattr(self, "local_feats", None) is None:
            return None
        s = self._new_stats()
        if self.old_stats is not None:
            s = s.merge(self.old_stats)
        elif self.mem_feats is not None:
            m = self.mem_train_idx
            s = s.merge(
                ClassStats.from_features(self.mem_feats[m], self.mem_targets[m], self.labels.names)
            )
        present = [c for c, n in zip(s.labels, s.counts.tolist()) if n > 0]
        return s.subset([c for c in self.labels.names if c in present])

    def _graft_if_needed(self) -> None:
        self.stats_all = self._all_stats()
        if not self.graft:
            return
        new = self.labels.names[self.num_old :]
        stats = self.stats_all
        if stats is None or any(c not in stats.labels for c in new):
            raise InputError(
                "the data has no examples of some new class; pass examples of every new class"
            )
        self.model = add_classes(
            self.model,
            new,
            init="stats",
            stats=stats,
            head=self.cfg.head,
            seed=self.cfg.seed,
            init_options={
                "shrinkage": self.cfg.shrinkage if self.cfg.shrinkage is not None else 0.1
            },
        )
        self.head_info = find_head(self.model, self.cfg.head)

    def _solve(self) -> None:
        self.solve_info: dict[str, Any] = {"solve": self.solve_name}
        if self.solve_name == "none":
            return
        head = get_module(self.model, self.path)
        ctx = SolveContext(
            head,
            self.labels.names,
            self.num_old,
            self.stats_all,
            self.old_stats,
            self.cfg.shrinkage,
            self.cfg.prior,
        )
        self.solve_info = SOLVERS.get(self.solve_name)(ctx)
        if ctx.head is not head:
            transplant_hooks(head, ctx.head)
            if self.path == "":
                self.model = ctx.head
            else:
                set_module(self.model, self.path, ctx.head)
        set_model_labels(self.model, self.labels)

    def _prepare_teacher(self) -> None:
        """Snapshot of the model as training starts; its outputs cached where possible."""
        self.teacher_logits: torch.Tensor | None = None
        self.teacher_mem_logits: torch.Tensor | None = None
        self.teacher_feats: torch.Tensor | None = None
        self.teacher_mem_feats: torch.Tensor | None = None
        self.teacher_model: nn.Module | None = None
        self.teacher_head: nn.Module | None = None
        self.distill = self.cfg.alpha > 0 and self.epochs > 0
        self.n_distill = len(self.labels) if self.distill_on == "all" else self.num_old
        head = get_module(self.model, self.path)
        if self.cfg.regime == "frozen":
            self.teacher_head = copy.deepcopy(head).eval().requires_grad_(False)
            if self.distill:
                self.teacher_logits = self._head_logits(self.teacher_head, self.feats)
                if self.mem_feats is not None:
                    self.teacher_mem_logits = self._head_logits(self.teacher_head, self.mem_feats)
            return
        if not (self.distill or self.cfg.feature_distill > 0) or self.epochs == 0:
            return
        self.teacher_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        pool = self._pool()
        cache = self.cfg.cache_teacher
        if cache is None:
            cache = pool.deterministic
        self.resolved["cache_teacher"] = bool(cache)
        if cache:
            logits, feats = self._teacher_pass(pool)
            self.teacher_cache = (logits, feats)
            self.teacher_model = None  # not needed any more: outputs are cached

    @torch.no_grad()
    def _head_logits(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = _head_weight(head)
        out = []
        for chunk in x.split(4096):
            out.append(head_forward(head, chunk.to(w.device, w.dtype)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, _rows(head))

    @torch.no_grad()
    def _teacher_pass(self, pool: Examples) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.teacher_model is not None
        idx = torch.arange(len(pool))
        local = idx[D.shard(len(idx))]
        logits, feats = [], []
        want_feats = self.cfg.feature_distill > 0
        with capture_inputs(self.teacher_model, [self.path]) as store, self._autocast():
            for chunk in local.split(max(self.cfg.batch_size, 256)):
                inputs = to_device(pool.inputs(chunk), self.device)
                out = logits_of(forward(self.teacher_model, inputs))
                logits.append(out[:, : self.n_distill].float().cpu())
                f = store[self.path].pop()
                store[self.path].clear()
                if want_feats:
                    feats.append(pool_features(f, inputs).float().cpu())
        lg = D.unshard(
            D.all_gather_cat(torch.cat(logits) if logits else torch.zeros(0, self.n_distill)),
            len(idx),
        )
        ft = D.unshard(D.all_gather_cat(torch.cat(feats)), len(idx)) if want_feats else None
        return lg, ft

    def _pool(self) -> Examples:
        """Training examples: the data's, then the memory's (indices as in the sampler)."""
        parts = [self.examples]
        if self.mem_examples is not None and len(self.mem_examples):
            parts.append(self.mem_examples)
        return Concat(parts) if len(parts) > 1 else self.examples

    # ------------------------------------------------------------------ training

    def _trainable(self) -> nn.Module:
        return get_module(self.model, self.path) if self.cfg.regime == "frozen" else self.model

    def _param_groups(self) -> list[dict[str, Any]]:
        head_ids = {id(p) for p in get_module(self.model, self.path).parameters()}
        for p in self.head_info.paths[1:]:
            head_ids |= {id(q) for q in get_module(self.model, p).parameters()}
        head_params, body = [], []
        for p in self._trainable().parameters():
            if not p.requires_grad:
                continue
            (head_params if id(p) in head_ids else body).append(p)
        groups = [{"params": head_params, "lr": self.cfg.lr, "base_lr": self.cfg.lr}]
        if body and self.train_backbone and self.cfg.backbone_lr > 0:
            lr = self.cfg.lr * self.cfg.backbone_lr
            groups.append({"params": body, "lr": lr, "base_lr": lr})
        return [g for g in groups if g["params"]]

    def _set_trainable(self) -> list[nn.Parameter]:
        """Freeze the backbone when it must not train; returns the parameters changed.

        Head parameters keep their own ``requires_grad`` (a split head's old block frozen by
        the caller stays frozen).
        """
        if self.train_backbone:
            return []
        head_ids = set()
        for p in self.head_info.paths:
            head_ids |= {id(q) for q in get_module(self.model, p).parameters()}
        changed = []
        for p in self.model.parameters():
            if id(p) not in head_ids and p.requires_grad:
                p.requires_grad_(False)
                changed.append(p)
        return changed

    def _train(self) -> None:
        cfg = self.cfg
        self.resumed_from: int | None = None
        if self.epochs == 0:
            return
        changed = self._set_trainable()
        trainable = self._trainable()
        groups = self._param_groups()
        if not groups:
            raise InputError("nothing to train: every parameter is frozen; unfreeze the head")
        optimizer = OPTIMIZERS.get(cfg.optimizer)(groups, cfg.lr, cfg.weight_decay)
        frozen_rows: FrozenRows | None = None
        if "old-rows" in self.freezes:
            frozen_rows = freeze_old_rows(self.model, optimizer, self.num_old, head=self.cfg.head)
        scaler = _scaler(self.device.type, self.amp_dtype, self.cfg.regime)
        sampler = self._sampler()
        steps = len(sampler) if isinstance(sampler, BalancedBatches) else sampler[1]
        total = steps * self.epochs
        fingerprint = self._fingerprint(trainable)
        start = 0
        if self.resume and self.ckpt_dir is not None:
            start = self._load_checkpoint(trainable, optimizer, scaler, fingerprint)
        wrapped = _ddp(trainable, self.device)
        distill = DistillationLoss(self.n_distill, temperature=cfg.temperature, alpha=cfg.alpha)
        feat_loss = FeatureDistillationLoss(cfg.feature_distill) if cfg.feature_distill else None
        self._pseudo_setup()
        bar = _Progress(self.progress and D.is_main(), self.epochs, steps)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda), bar:
                for epoch in range(start, self.epochs):
                    t0 = time.perf_counter()
                    torch.manual_seed(_epoch_seed(cfg.seed, epoch) + D.group_rank())
                    trainable.train()
                    if self.cfg.regime == "full" and not self.train_backbone:
                        self.model.eval()
                        get_module(self.model, self.path).train()
                    sums = {"loss": 0.0, "ce": 0.0, "distill": 0.0, "feature": 0.0}
                    g = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
                    gp = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch) + 1)
                    bar.start_epoch(epoch)
                    for i, batch in enumerate(self._batches(sampler, g)):
                        step = epoch * steps + i
                        for grp in optimizer.param_groups:
                            grp["lr"] = grp["base_lr"] * SCHEDULES.get(cfg.schedule)(step, total)
                        parts = self._step(wrapped, batch, gp, distill, feat_loss)
                        loss = parts["loss"]
                        optimizer.zero_grad(set_to_none=True)
                        if scaler is not None:
                            scaler.scale(loss).backward()
                            scaler.step(optimizer)
                            scaler.update()
                        else:
                            loss.backward()
                            optimizer.step()
                        if cfg.wa_clip:
                            clip_nonnegative(
                                get_module(self.model, self.path),
                                start=self.num_old if frozen_rows else 0,
                            )
                        for k, v in parts.items():
                            sums[k] += float(v.detach())
                        bar.advance(float(loss.detach()))
                    if D.is_distributed():  # the epoch's mean losses over every rank
                        keys = sorted(sums)
                        tot = D.all_reduce_sum(torch.tensor([sums[k] for k in keys]))
                        sums = {k: float(v) / D.world_size() for k, v in zip(keys, tot)}
                    record = {
                        "epoch": epoch + 1,
                        "steps": steps,
                        **{k: v / max(steps, 1) for k, v in sums.items()},
                        "seconds": time.perf_counter() - t0,
                    }
                    self.history.append(record)
                    self._save_checkpoint(trainable, optimizer, scaler, epoch, fingerprint)
                    for cb in self.callbacks:
                        cb(dict(record))
        finally:
            if frozen_rows is not None:
                frozen_rows.remove()
            for p in changed:
                p.requires_grad_(True)
        trainable.eval()

    def _sampler(self) -> BalancedBatches | tuple[str, int]:
        n_train = len(self.train_idx)
        n_mem = len(self.mem_train_idx) if self.replay == "exemplars" else 0
        if n_train == 0:
            raise InputError(
                "no training examples left after the held-out slice; lower "
                "holdout or pass more data"
            )
        b = self._real_batch_size()
        if self.sampling == "balanced":
            targets = torch.cat([self.targets, self.mem_targets])
            parts = [self.train_idx]
            if n_mem:
                parts.append(len(self.targets) + self.mem_train_idx)
            return BalancedBatches(targets, b, parts=parts, steps=-(-(n_train + n_mem) // b))
        return ("shuffle", -(-(n_train + n_mem) // b))

    def _real_batch_size(self) -> int:
        """Slots of a batch that hold real examples (the rest are pseudo-features)."""
        b = self.cfg.batch_size
        if self.replay != "stats":
            return b
        n_old = self.num_old
        data_classes = len(torch.unique(self.targets[self.train_idx]))
        self.n_pseudo = max(1, round(b * n_old / (n_old + data_classes)))
        return max(1, b - self.n_pseudo)

    def _batches(self, sampler: Any, g: torch.Generator) -> Iterator[torch.Tensor]:
        if isinstance(sampler, BalancedBatches):
            batches: Iterator[torch.Tensor] = sampler.epoch(g)
        else:
            pool = self.train_idx
            if self.replay == "exemplars":
                pool = torch.cat([pool, len(self.targets) + self.mem_train_idx])
            perm = pool[torch.randperm(len(pool), generator=g)]
            batches = iter(perm.split(self._real_batch_size()))
        for batch in batches:
            yield batch[D.group_rank() :: D.world_size()]

    def _pseudo_setup(self) -> None:
        self.pseudo = None
        if self.replay != "stats":
            return
        assert self.old_stats is not None
        s = self.old_stats
        shrink = self.solve_info.get("shrinkage", self.cfg.shrinkage)
        if shrink is None:
            from .strategies import oas_shrinkage

            shrink = oas_shrinkage(s)
        chol = torch.linalg.cholesky(s.covariance(shrink)).float()
        self.pseudo = (s.means().float(), chol)
        self.resolved["pseudo_per_batch"] = self.n_pseudo

    def _pseudo_batch(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.pseudo is not None
        mu, chol = self.pseudo
        n = self.n_pseudo
        # classes in balanced rounds: every old class equally often
        reps = -(-n // len(mu))
        cls = torch.cat([torch.randperm(len(mu), generator=g) for _ in range(reps)])[:n]
        z = torch.randn(n, mu.shape[1], generator=g)
        x = mu[cls] + z @ chol.T
        share = cls[D.group_rank() :: D.world_size()]
        return x[D.group_rank() :: D.world_size()], share

    def _step(
        self,
        wrapped: nn.Module,
        batch: torch.Tensor,
        gp: torch.Generator,
        distill: DistillationLoss,
        feat_loss: FeatureDistillationLoss | None,
    ) -> dict[str, torch.Tensor]:
        y = self._all_targets()[batch].to(self.device)
        if self.cfg.regime == "frozen":
            feats = self._pool_feats()[batch]
            soft = self._pool_soft(distill).select(batch) if self.distill else None
            if self.pseudo is not None:
                px, py = self._pseudo_batch(gp)
                feats = torch.cat([feats, px.to(self.device)])
                y = torch.cat([y, py.to(self.device)])
                if soft is not None:
                    assert self.teacher_head is not None
                    extra = distill.soft_targets(self._head_logits(self.teacher_head, px))
                    soft = _cat_soft(soft, extra.to(self.device))
            head = get_module(self.model, self.path)
            x = feats.to(self.device, _head_weight(head).dtype)
            if head_kind(head).dim == 1:
                logits = wrapped(x[:, :, None, None])[:, :, 0, 0].float()
            else:
                logits = wrapped(x).float()
            if soft is not None:
                ce, kl = _ce_and_distill(logits, y, soft, distill)
                return {"ce": ce, "distill": kl, "loss": ce + kl}
            ce = F.cross_entropy(logits, y)
            return {"ce": ce, "loss": ce}
        pool = self._pool()
        inputs = to_device(pool.inputs(batch), self.device)
        want_feats = feat_loss is not None
        with contextlib.ExitStack() as stack:
            store = (
                stack.enter_context(capture_inputs(self.model, [self.path])) if want_feats else None
            )
            with self._autocast():
                logits = logits_of(forward(wrapped, inputs)).float()
            s_feats = pool_features(store[self.path][-1], inputs) if store is not None else None
        if self.distill and getattr(self, "teacher_cache", None) is not None:
            soft = self._full_soft(distill).select(batch)
            ce, kl = _ce_and_distill(logits, y, soft, distill)
            parts = {"ce": ce, "distill": kl}
        else:
            parts = {"ce": F.cross_entropy(logits, y)}
        if (self.distill and getattr(self, "teacher_cache", None) is None) or want_feats:
            t_logits, t_feats = self._teacher_outputs(batch, inputs)
            if self.distill and "distill" not in parts:
                parts["distill"] = distill(logits, t_logits.to(self.device))
            if want_feats and s_feats is not None and t_feats is not None:
                parts["feature"] = feat_loss(s_feats, t_feats.to(self.device))
        parts["loss"] = sum(parts.values())
        return parts

    def _all_targets(self) -> torch.Tensor:
        if not hasattr(self, "_all_targets_cache"):
            self._all_targets_cache = torch.cat([self.targets, self.mem_targets])
        return self._all_targets_cache

    def _pool_feats(self) -> torch.Tensor:
        if not hasattr(self, "_pool_feats_cache"):
            assert self.feats is not None
            parts = [self.feats]
            if self.mem_feats is not None:
                parts.append(self.mem_feats)
            self._pool_feats_cache = torch.cat(parts).to(self.device)
        return self._pool_feats_cache

    def _pool_soft(self, distill: DistillationLoss) -> SoftTargets:
        """The teacher's soft targets for every pool example (frozen regime), made once."""
        if not hasattr(self, "_pool_soft_cache"):
            assert self.teacher_logits is not None
            parts = [self.teacher_logits]
            if self.teacher_mem_logits is not None:
                parts.append(self.teacher_mem_logits)
            logits = torch.cat(parts)
            self._pool_soft_cache = distill.soft_targets(logits).to(self.device)
        return self._pool_soft_cache

    def _full_soft(self, distill: DistillationLoss) -> SoftTargets:
        """The teacher's soft targets from its cached outputs (full regime), made once."""
        if not hasattr(self, "_full_soft_cache"):
            logits, _ = self.teacher_cache
            self._full_soft_cache = distill.soft_targets(logits).to(self.device)
        return self._full_soft_cache

    @torch.no_grad()
    def _teacher_outputs(
        self,
        batch: torch.Tensor,
        inputs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = getattr(self, "teacher_cache", None)
        if cache is not None:
            logits, feats = cache
            return logits[batch], None if feats is None else feats[batch]
        assert self.teacher_model is not None
        with capture_inputs(self.teacher_model, [self.path]) as store, self._autocast():
            out = logits_of(forward(self.teacher_model, inputs)).float()
        f = store[self.path][-1] if store[self.path] else None
        return out[:, : self.n_distill], None if f is None else pool_features(f, inputs).float()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype == torch.float32 or self.cfg.regime == "frozen":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ checkpoints

    def _fingerprint(self, trainable: nn.Module) -> str:
        """Hash of what the run starts from: trainable weights, targets, settings."""
        h = hashlib.sha256()
        for k, v in sorted(trainable.state_dict().items()):
            h.update(k.encode())
            h.update(
                v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                if v.numel()
                else b""
            )
        h.update(self.targets.numpy().tobytes())
        h.update(self.mem_targets.numpy().tobytes())
        settings = {k: v for k, v in self.cfg.to_dict().items() if k not in ("device",)}
        h.update(json.dumps(settings, sort_keys=True).encode())
        h.update(str(D.world_size()).encode())
        return h.hexdigest()

    def _save_checkpoint(
        self,
        trainable: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        epoch: int,
        fingerprint: str,
    ) -> None:
        if self.ckpt_dir is None:
            return
        if D.is_main():
            from ..io.atomic import atomic_path

            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "fingerprint": fingerprint,
                "trainable": {k: v.detach().cpu() for k, v in trainable.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "history": json.dumps(self.history),
            }
            with atomic_path(self.ckpt_dir / CHECKPOINT_NAME) as tmp:
                torch.save(state, tmp)
        D.barrier()

    def _load_checkpoint(
        self, trainable: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, fingerprint: str
    ) -> int:
        assert self.ckpt_dir is not None
        path = self.ckpt_dir / CHECKPOINT_NAME
        if not path.is_file():
            log.info("no checkpoint in %s; starting from the beginning", self.ckpt_dir)
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise InputError(
                f"cannot read the checkpoint {path} ({type(e).__name__}); delete it to start again"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise InputError(
                f"{path} is not a headgraft learn checkpoint; choose another --checkpoint-dir"
            )
        if state["fingerprint"] != fingerprint:
            raise InputError(
                f"the checkpoint in {self.ckpt_dir} was written by a run with other "
                "settings, data or model; resume with the same ones, or use a new "
                "--checkpoint-dir"
            )
        trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        self.history = json.loads(state.get("history") or "[]")
        self.resumed_from = int(state["epoch"]) + 1
        return self.resumed_from

    # ------------------------------------------------------------------ calibration

    def _calibrate(self) -> dict[str, Any] | None:
        method = self.cfg.calibrate
        if method == "none":
            return {"name": "none"}
        head = get_module(self.model, self.path)
        feats, targets = self._holdout_features()
        correction = calibrate(head, self.num_old, feats, targets, method)
        out = correction.to_dict()
        out["holdout"] = {"examples": int(len(targets)), "old": int((targets < self.num_old).sum())}
        return out

    def _holdout_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_info.in_features
        parts_x: list[torch.Tensor] = []
        parts_y: list[torch.Tensor] = []
        if len(self.hold_idx):
            if self.cfg.regime == "frozen" and self.feats is not None:
                parts_x.append(self.feats[self.hold_idx])
            else:
                parts_x.append(self._features(self.model, self.examples, self.hold_idx))
            parts_y.append(self.targets[self.hold_idx])
        if len(self.mem_hold_idx) and self.mem_examples is not None:
            if self.cfg.regime == "frozen" and self.mem_feats is not None:
                parts_x.append(self.mem_feats[self.mem_hold_idx])
            else:
                parts_x.append(self._features(self.model, self.mem_examples, self.mem_hold_idx))
            parts_y.append(self.mem_targets[self.mem_hold_idx])
        x = torch.cat(parts_x) if parts_x else torch.zeros(0, d)
        y = torch.cat(parts_y) if parts_y else torch.zeros(0, dtype=torch.int64)
        return x, y


# ============================================================================ helpers


FUSED_MIN_LOGITS = 16384


def _ce_and_distill(
    logits: torch.Tensor, y: torch.Tensor, soft: SoftTargets, distill: DistillationLoss
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and distillation from cached soft targets: one fused node for large
    logits (fewer passes over memory), two ordinary losses for small ones (fewer calls)."""
    if logits.numel() >= FUSED_MIN_LOGITS:
        return cross_entropy_with_distillation(logits, y, soft, distill.alpha)
    return F.cross_entropy(logits, y), distill(logits, soft=soft)


def _cat_soft(a: SoftTargets, b: SoftTargets) -> SoftTargets:
    return SoftTargets(
        torch.cat([a.probs, b.probs]), torch.cat([a.neg_entropy, b.neg_entropy]), a.temperature
    )


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _head_weight(head: nn.Module) -> torch.Tensor:
    while isinstance(head, SplitHead):
        head = head.old
    return head.weight


def _rows(head: nn.Module) -> int:
    if isinstance(head, SplitHead):
        return head.out_features
    return head.weight.shape[0]


def _scaler(device_type: str, dtype: torch.dtype, regime: str) -> Any:
    if regime == "full" and dtype == torch.float16 and device_type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    if not D.is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


class _Progress:
    """rich progress bars: one for epochs, one for the steps of the current epoch."""

    def __init__(self, enabled: bool, epochs: int, steps: int) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self.steps = steps
        self._p: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._p.__enter__()
            self._epochs = self._p.add_task("epochs", total=self.epochs, loss="")
            self._steps = self._p.add_task("steps", total=self.steps, loss="")
        return self

    def start_epoch(self, epoch: int) -> None:
        if self._p is not None:
            self._p.update(self._epochs, completed=epoch)
            self._p.reset(self._steps, total=self.steps, loss="")
            self._p.update(self._steps, description=f"epoch {epoch + 1}")

    def advance(self, loss: float) -> None:
        if self._p is not None:
            self._p.update(self._steps, advance=1, loss=f"loss {loss:.4f}")

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            if exc[0] is None:
                self._p.update(self._epochs, completed=self.epochs)
            self._p.__exit__(*exc)


__all__ = ["LearnConfig", "LearnResult", "Learner", "learn", "HeadgraftError"]
