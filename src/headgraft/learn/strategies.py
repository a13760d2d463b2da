"""The registered options of ``headgraft.learn``: regimes, head solves, replays, freezing,
batch sampling, optimizers, learning-rate schedules, devices, precisions and recipes.

Each option is registered once here (or, for calibrations and exemplar selections, next to
its code in ``calibrate.py`` and ``memory.py``); the command line's choices, the help texts
and the error for an unknown name all come from these registries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError, UnsupportedHeadError
from ..graft import full_rows, head_logits
from ..heads import with_rows
from ..inits import INITS, InitContext
from ..layers import CosineLinear, SplitHead
from ..registry import Registry
from ..stats import ClassStats

# ----------------------------------------------------------------------------- simple choices

REGIMES: Registry[str] = Registry("regime")
REGIMES.register(
    "frozen",
    "backbone frozen: head inputs computed once and cached, only the "
    "head trains (seconds, not minutes)",
)("frozen")
REGIMES.register(
    "full",
    "full fine-tuning: the backbone trains too (at backbone_lr times the head's learning rate)",
)("full")

REPLAYS: Registry[str] = Registry("replay")
REPLAYS.register(
    "auto",
    "exemplars when a memory is given, else statistics with a frozen "
    "backbone and old-class statistics, else none",
)("auto")
REPLAYS.register(
    "none",
    "no old-class examples in the batches (only the old classes examples the data itself contains)",
)("none")
REPLAYS.register(
    "exemplars",
    "stored examples of old classes (ExemplarMemory) in every batch, "
    "class-balanced with the new data",
)("exemplars")
REPLAYS.register(
    "stats",
    "data-free: pseudo-features of old classes sampled from their "
    "ClassStats (N(mean, shared covariance)) in every batch; frozen backbone "
    "only",
)("stats")

FREEZES: Registry[str] = Registry("freeze")
FREEZES.register(
    "auto",
    "old rows when old-class features are in the batches and the head "
    "was not re-solved, else nothing",
)("auto")
FREEZES.register("nothing", "every parameter of the trained part learns")("nothing")
FREEZES.register("backbone", "only the head trains (implied by the frozen regime)")("backbone")
FREEZES.register(
    "old-rows",
    "old rows and biases stay bit-identical: gradients masked and "
    "restored after every step (no weight decay or momentum drift); needs "
    "old-class features in the batches",
)("old-rows")

SAMPLINGS: Registry[str] = Registry("sampling")
SAMPLINGS.register("auto", "balanced with replay, shuffle without")("auto")
SAMPLINGS.register("balanced", "class-balanced batches; new data and memory in every step")(
    "balanced"
)
SAMPLINGS.register("shuffle", "plain shuffled epochs over the training examples")("shuffle")

DISTILL_TARGETS: Registry[str] = Registry("distillation target")
DISTILL_TARGETS.register(
    "auto", "all logits when the head was re-solved before training, else the old classes' logits"
)("auto")
DISTILL_TARGETS.register(
    "old", "LwF: the old classes' logits of the model as it was when learning started"
)("old")
DISTILL_TARGETS.register(
    "all", "every logit of the model as it was when learning started (after a closed-form solve)"
)("all")

PRIORS: Registry[str] = Registry("class prior")
PRIORS.register(
    "uniform", "closed-form heads treat every class as equally likely (balanced accuracy)"
)("uniform")
PRIORS.register("counts", "closed-form heads use the classes' example counts as prior")("counts")


def _cpu_ok() -> bool:
    return True


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def _mps_ok() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


DEVICES: Registry[Callable[[], bool]] = Registry("device")
DEVICES.register("auto", "cuda if available, else mps, else cpu")(_cpu_ok)
DEVICES.register("cpu", "the CPU")(_cpu_ok)
DEVICES.register("cuda", "an NVIDIA GPU (cuda:LOCAL_RANK under torchrun)")(_cuda_ok)
DEVICES.register("mps", "Apple-silicon GPU")(_mps_ok)


def resolve_device(name: str) -> str:
    """The device type to use for ``name`` (``auto`` picks the best available)."""
    check = DEVICES.get(name)
    if name == "auto":
        return "cuda" if _cuda_ok() else "mps" if _mps_ok() else "cpu"
    if not check():
        raise InputError(
            f"device {name!r} is not available on this machine; choose one of: "
            f"{', '.join(n for n in DEVICES.names() if DEVICES.get(n)())}"
        )
    return name


PRECISIONS: Registry[torch.dtype | None] = Registry("precision")
PRECISIONS.register(
    "auto", "bf16 autocast on GPUs that support it, float16 on other GPUs and MPS, float32 on CPU"
)(None)
PRECISIONS.register("32", "float32 everywhere")(torch.float32)
PRECISIONS.register("bf16", "bfloat16 autocast for the forward pass")(torch.bfloat16)
PRECISIONS.register("16", "float16 autocast with loss scaling (CUDA) for the forward pass")(
    torch.float16
)


def resolve_precision(name: str, device_type: str) -> torch.dtype:
    """The autocast dtype for ``name`` on ``device_type`` (float32 means no autocast)."""
    dtype = PRECISIONS.get(name)
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device_type == "mps" else torch.float32
    if dtype == torch.float16 and device_type == "cpu":
        raise InputError("float16 autocast is not supported on the CPU; use --precision bf16 or 32")
    assert dtype is not None
    return dtype


OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("adamw", "AdamW (decoupled weight decay)")
def _adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("sgd", "SGD with momentum 0.9 and weight decay")
def _sgd(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


SCHEDULES: Registry[Callable[[int, int], float]] = Registry("schedule")


@SCHEDULES.register("constant", "the same learning rate throughout")
def _constant(step: int, total: int) -> float:
    return 1.0


@SCHEDULES.register("cosine", "cosine decay from the learning rate to zero over the run")
def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


# ----------------------------------------------------------------------------- head solves


def oas_shrinkage(stats: ClassStats) -> float:
    """Oracle-approximating shrinkage (Chen et al., 2010) of the pooled covariance.

    Computed from the statistics alone (covariance, example count, dimension), so the
    closed-form head adapts its regularisation to how many examples back each dimension.
    """
    s = stats.covariance(0.0)
    p = s.shape[0]
    n = max(stats.total - int((stats.counts > 0).sum()), 1)
    tr = float(torch.trace(s))
    tr2 = float(torch.trace(s @ s))
    num = (1 - 2 / p) * tr2 + tr * tr
    den = (n + 1 - 2 / p) * (tr2 - tr * tr / p)
    if den <= 0:
        return 1.0
    return float(min(1.0, max(num / den, 1e-6)))


def lda_rows(
    stats: ClassStats,
    labels: Sequence[str],
    *,
    shrinkage: float | None = None,
    prior: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Shared-covariance LDA rows for ``labels``: float64 ``W [C, d]``, ``b [C]``, shrinkage.

    ``w_c = S^-1 mu_c`` and ``b_c = -mu_c S^-1 mu_c / 2 (+ log p_c with prior='counts')``;
    ``S`` is the pooled covariance shrunk by ``shrinkage`` (OAS when None).
    """
    PRIORS.get(prior)
    missing = [c for c in labels if c not in stats.labels]
    if missing:
        raise InputError(
            f"the statistics have no class(es) {', '.join(missing[:10])}; collect "
            "statistics of every class (old ones with `headgraft stats` on the "
            "old data)"
        )
    empty = [c for c in labels if int(stats.counts[stats.labels.index(c)]) == 0]
    if empty:
        raise InputError(
            f"no examples of class(es) {', '.join(empty[:10])} in the statistics; "
            "collect data for every class"
        )
    shrink = oas_shrinkage(stats) if shrinkage is None else float(shrinkage)
    cov = stats.covariance(shrink)
    idx = [stats.labels.index(c) for c in labels]
    mu = stats.means()[idx]
    w = torch.linalg.solve(cov, mu.T).T
    b = -0.5 * (w * mu).sum(1)
    if prior == "counts":
        b = b + stats.log_prior()[idx]
    return w, b, shrink


SolveFn = Callable[["SolveContext"], dict[str, Any]]
SOLVERS: Registry[SolveFn] = Registry("head solve")


class SolveContext:
    """What a head solve may use: the head, label names, statistics and settings."""

    def __init__(
        self,
        head: nn.Module,
        labels: list[str],
        num_old: int,
        stats: ClassStats | None,
        old_stats: ClassStats | None,
        shrinkage: float | None,
        prior: str,
    ) -> None:
        self.head = head
        self.labels = labels
        self.num_old = num_old
        self.stats = stats
        self.old_stats = old_stats
        self.shrinkage = shrinkage
        self.prior = prior

    def need_stats(self, name: str) -> ClassStats:
        if self.stats is None or any(c not in self.stats.labels for c in self.labels):
            raise InputError(
                f"head solve {name!r} needs statistics of every class (old and "
                "new); pass stats= (CLI: --stats) for the old classes or an "
                "exemplar memory, or choose --solve none"
            )
        return self.stats


def _set_rows(head: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A fused head of the same kind holding ``weight``/``bias`` (cast to its dtype/device)."""
    base = head.old if isinstance(head, SplitHead) else head
    w0, b0 = full_rows(head)
    w = weight.reshape(weight.shape[0], *w0.shape[1:]).to(w0)
    b = None if b0 is None else (torch.zeros(len(w)) if bias is None else bias).to(b0)
    return with_rows(base, w, b)


@SOLVERS.register("none", "keep the rows as grafted (or as given)")
def _solve_none(ctx: SolveContext) -> dict[str, Any]:
    return {"solve": "none"}


@SOLVERS.register(
    "stats",
    "re-solve every row in closed form (shared-covariance LDA, OAS shrinkage) from old and "
    "new class statistics: the data-free path; old rows change",
)
def _solve_stats(ctx: SolveContext) -> dict[str, Any]:
    stats = ctx.need_stats("stats")
    if isinstance(ctx.head, SplitHead) or isinstance(ctx.head, CosineLinear):
        raise UnsupportedHeadError(
            "head solve 'stats' rewrites every row of a fused linear "
            "head; fuse split heads first (headgraft.fuse) or choose "
            "--solve stats-new; cosine heads cannot hold LDA rows"
        )
    w, b, shrink = lda_rows(stats, ctx.labels, shrinkage=ctx.shrinkage, prior=ctx.prior)
    if getattr(ctx.head, "bias", None) is None:
        b = None  # a head without bias cannot hold the intercepts; the rows alone are kept
    ctx.head = _set_rows(ctx.head, w.float(), None if b is None else b.float())
    return {"solve": "stats", "shrinkage": shrink, "prior": ctx.prior}


@SOLVERS.register(
    "stats-new",
    "solve the new rows in closed form (LDA) and scale them to the old head's logits; old "
    "rows untouched",
)
def _solve_stats_new(ctx: SolveContext) -> dict[str, Any]:
    stats = ctx.need_stats("stats-new")
    w, b = full_rows(ctx.head)
    w2 = w.float().reshape(w.shape[0], -1)
    base = ctx.head.old if isinstance(ctx.head, SplitHead) else ctx.head
    shrink = oas_shrinkage(stats) if ctx.shrinkage is None else ctx.shrinkage
    ictx = InitContext(
        weight=w2[: ctx.num_old],
        bias=None if b is None else b[: ctx.num_old].float(),
        old_labels=ctx.labels[: ctx.num_old],
        new_labels=ctx.labels[ctx.num_old :],
        num_total=len(ctx.labels),
        stats=stats,
        options={"shrinkage": shrink},
        logits=lambda x: head_logits(_old_only(ctx.head, ctx.num_old), x),
        cosine_scale=float(base.scale) if isinstance(base, CosineLinear) else None,
    )
    rows = INITS.get("stats")(ictx)
    new_w = rows.weight.reshape(-1, *w.shape[1:]).to(w)
    with torch.no_grad():
        if isinstance(ctx.head, SplitHead):
            ctx.head.new.weight.copy_(new_w)
            if b is not None and rows.bias is not None:
                ctx.head.new.bias.copy_(rows.bias.to(b))
        else:
            ctx.head.weight[ctx.num_old :] = new_w
            if b is not None and rows.bias is not None:
                ctx.head.bias[ctx.num_old :] = rows.bias.to(b)
    return {"solve": "stats-new", "shrinkage": shrink}


def _old_only(head: nn.Module, num_old: int) -> nn.Module:
    if isinstance(head, SplitHead):
        return head.old
    w, b = full_rows(head)
    return with_rows(head, w[:num_old].clone(), None if b is None else b[:num_old].clone())


# ----------------------------------------------------------------------------- recipes

RECIPES: Registry[dict[str, Any]] = Registry("recipe")
RECIPES.register(
    "naive",
    "fine-tune on the new data alone: no distillation, no replay, "
    "nothing frozen (the forgetting baseline)",
)(
    {
        "solve": "none",
        "replay": "none",
        "alpha": 0.0,
        "freeze": "nothing",
        "calibrate": "none",
        "sampling": "shuffle",
        "backbone_lr": 1.0,
    }
)
RECIPES.register(
    "lwf", "distillation alone (Learning without Forgetting): KL on the old logits, no stored data"
)(
    {
        "solve": "none",
        "replay": "none",
        "alpha": 1.0,
        "freeze": "nothing",
        "calibrate": "none",
        "sampling": "shuffle",
        "distill_on": "old",
        "backbone_lr": 1.0,
    }
)
RECIPES.register(
    "replay",
    "exemplar replay with distillation, class-balanced batches, "
    "head solved from old statistics when available, calibration chosen on a "
    "held-out slice",
)({"replay": "exemplars", "alpha": 1.0, "calibrate": "auto"})
RECIPES.register(
    "data-free",
    "no stored inputs: the whole head re-solved in closed form "
    "from old statistics and new data, frozen backbone",
)({"regime": "frozen", "solve": "stats", "replay": "none", "epochs": 0, "calibrate": "auto"})
RECIPES.register(
    "stats-replay",
    "no stored inputs: pseudo-features of old classes sampled "
    "from their statistics replayed while the head trains, frozen backbone",
)({"regime": "frozen", "solve": "stats-new", "replay": "stats", "calibrate": "auto"})
RECIPES.register(
    "auto",
    "the recommended combination for what is given: closed-form solve "
    "with statistics, exemplar replay with a memory, distillation always",
)({})
