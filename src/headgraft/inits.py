"""New-row initialisers and bias policies, each registered once under a name.

An initialiser gets an :class:`InitContext` (the old rows, the new label names, optional
features of new-class examples, optional class statistics, a seeded generator) and returns
:class:`NewRows`. A bias policy then sets the new rows' bias. Everything is computed in float32
(float64 for statistics) and cast to the head's dtype by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import InputError
from .registry import Registry

if TYPE_CHECKING:
    from .stats import ClassStats


@dataclass
class InitContext:
    """What an initialiser may use.

    Attributes:
        weight: old rows, float32 ``[n, in_features]``.
        bias: old biases, float32 ``[n]``, or None for a head without bias.
        old_labels: names of the old rows.
        new_labels: names of the rows to create.
        num_total: n + k, the class count after grafting.
        features: new label -> float32 ``[N, in_features]`` head inputs of its examples.
        old_features: old label -> features, when the examples include old classes.
        stats: class statistics (for ``stats`` and ``prior``).
        generator: seeded source of randomness.
        options: initialiser-specific settings (``distribution``, ``source``, ``noise``...).
        logits: maps float32 features ``[N, d]`` to the old head's logits ``[N, n]``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    old_labels: list[str]
    new_labels: list[str]
    num_total: int
    features: dict[str, torch.Tensor] | None = None
    old_features: dict[str, torch.Tensor] | None = None
    stats: ClassStats | None = None
    generator: torch.Generator | None = None
    options: dict[str, Any] = field(default_factory=dict)
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    cosine_scale: float | None = None  # set for cosine heads: rows are compared by direction

    @property
    def k(self) -> int:
        return len(self.new_labels)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device="cpu").to(self.weight.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device="cpu").to(self.weight.device)

    def mean_norm(self) -> float:
        return float(self.weight.norm(dim=1).mean())

    def spread(self) -> float:
        """The old rows' element std; 1/sqrt(in_features) when there is none (one element,
        or all equal), so noise scaled by it never vanishes or turns NaN."""
        std = float(self.weight.std()) if self.weight.numel() > 1 else 0.0
        return std if std > 0 else 1.0 / math.sqrt(self.in_features)

    def need_features(self, what: str) -> dict[str, torch.Tensor]:
        """The new classes' features; ``what`` (e.g. ``"init 'imprint'"``) names the user."""
        if not self.features:
            raise InputError(
                f"{what} needs examples of the new classes; pass examples=(inputs, "
                "labels) or a DataLoader (CLI: --data PATH)"
            )
        missing = [c for c in self.new_labels if c not in self.features]
        if missing:
            raise InputError(
                f"{what}: the examples have none of class(es) {', '.join(missing)}; "
                "add at least one example of every new class"
            )
        return self.features

    def need_stats(self, what: str) -> ClassStats:
        if self.stats is None:
            raise InputError(
                f"{what} needs class statistics; pass stats=ClassStats (CLI: --stats FILE, "
                "made by `headgraft stats`)"
            )
        return self.stats


@dataclass
class NewRows:
    """What an initialiser produced.

    ``bias`` is the initialiser's own suggestion, or ``bias_policy`` the policy it suggests
    (used when the caller's policy is ``auto``, else ``mean``); ``old_weight``/``old_bias``
    are set only when the caller allowed re-solving old rows.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    bias_policy: str | None = None
    old_weight: torch.Tensor | None = None
    old_bias: torch.Tensor | None = None

    def report(self, old_weight: torch.Tensor) -> dict[str, float]:
        """Row-norm statistics of the new rows beside the old ones."""
        new_n = self.weight.float().norm(dim=1)
        old_n = old_weight.float().norm(dim=1)
        return {
            "old_norm_mean": float(old_n.mean()),
            "old_norm_std": float(old_n.std()) if len(old_n) > 1 else 0.0,
            "new_norm_mean": float(new_n.mean()),
            "new_norm_min": float(new_n.min()),
            "new_norm_max": float(new_n.max()),
        }


Initialiser = Callable[[InitContext], NewRows]
BiasPolicy = Callable[[InitContext, NewRows], torch.Tensor]

INITS: Registry[Initialiser] = Registry("init")
BIASES: Registry[BiasPolicy] = Registry("bias policy")


# ----------------------------------------------------------------------------- initialisers


@INITS.register("zeros", "all-zero rows: new classes start from their bias alone")
def _zeros(ctx: InitContext) -> NewRows:
    return NewRows(torch.zeros(ctx.k, ctx.in_features, device=ctx.weight.device))


@INITS.register(
    "random",
    "random rows; distribution= kaiming_uniform (nn.Linear's default), xavier_uniform or "
    "normal (matched to the old rows' spread); fan_in is the head's in_features",
)
def _random(ctx: InitContext) -> NewRows:
    dist = ctx.options.get("distribution", "kaiming_uniform")
    fan_in = ctx.in_features
    if dist == "kaiming_uniform":
        # nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)) -> bound = 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(fan_in)
        w = (ctx.rand(ctx.k, fan_in) * 2 - 1) * bound
    elif dist == "xavier_uniform":
        bound = math.sqrt(6.0 / (fan_in + ctx.num_total))
        w = (ctx.rand(ctx.k, fan_in) * 2 - 1) * bound
    elif dist == "normal":
        std = ctx.spread()
        w = ctx.randn(ctx.k, fan_in) * std + float(ctx.weight.mean())
    else:
        raise InputError(
            f"unknown distribution {dist!r} for init 'random'; choose one of: "
            "kaiming_uniform, xavier_uniform, normal"
        )
    return NewRows(w)


def _noise(ctx: InitContext, like: torch.Tensor) -> torch.Tensor:
    """Small noise (``noise`` x the old rows' element std) so that copies never tie."""
    scale = float(ctx.options.get("noise", 0.01)) * ctx.spread()
    return ctx.randn(*like.shape) * scale


def _nearest_old(ctx: InitContext, label: str) -> int:
    """The old class whose logit is highest, on average, for the new class's examples."""
    feats = ctx.need_features("init 'copy'")[label]
    assert ctx.logits is not None
    return int(ctx.logits(feats).mean(0).argmax())


@INITS.register(
    "copy",
    "copy of an existing class's row plus small noise; source= an old label (or a mapping "
    "new->old); without source, the old class the new examples score highest on",
)
def _copy(ctx: InitContext) -> NewRows:
    source = ctx.options.get("source")
    idx = []
    for label in ctx.new_labels:
        src = source.get(label) if isinstance(source, dict) else source
        if src is None:
            if not ctx.features:
                raise InputError(
                    "init 'copy' needs a source class (init_options={'source': 'cat'}, CLI: "
                    "--init-arg source=cat) or examples of the new classes to pick one"
                )
            idx.append(_nearest_old(ctx, label))
        else:
            if str(src) not in ctx.old_labels:
                raise InputError(
                    f"copy source {src!r} is not an existing class; choose one of: "
                    f"{', '.join(ctx.old_labels[:20])}"
                )
            idx.append(ctx.old_labels.index(str(src)))
    w = ctx.weight[idx].clone()
    bias = ctx.bias[idx].clone() if ctx.bias is not None else None
    return NewRows(w + _noise(ctx, w), bias=bias)


@INITS.register(
    "mean",
    "mean of the old rows plus a small sample from their covariance (like Hugging Face's "
    "mean_resizing), so several new rows do not tie",
)
def _mean(ctx: InitContext) -> NewRows:
    w = ctx.weight.double()
    mu = w.mean(0)
    centred = w - mu
    # sample from N(mu, eps * cov) without forming cov: cov^(1/2) z = centred.T @ z / sqrt(n)
    z = ctx.randn(ctx.k, w.shape[0]).double()
    eps = float(ctx.options.get("noise", 1e-2))
    sample = z @ centred / math.sqrt(max(w.shape[0], 1))
    if not sample.abs().sum():  # one old row (or all equal): no covariance to sample from
        sample = ctx.randn(ctx.k, w.shape[1]).double() * ctx.spread()
    return NewRows((mu + math.sqrt(eps) * sample).float())


@INITS.register(
    "imprint",
    "L2-normalised mean feature of each new class's examples, scaled to the old rows' mean "
    "norm (Qi et al., imprinted weights); needs examples. Its auto bias is 'balanced': at "
    "level biases imprinted rows win on most old-class inputs whose features share a common "
    "component (ReLU features)",
)
def _imprint(ctx: InitContext) -> NewRows:
    feats = ctx.need_features("init 'imprint'")
    scale = 1.0 if ctx.cosine_scale is not None else ctx.mean_norm()
    w = torch.stack(
        [F.normalize(F.normalize(feats[c], dim=1).mean(0), dim=0) for c in ctx.new_labels]
    )
    return NewRows(w * scale, bias_policy="balanced")


@INITS.register(
    "stats",
    "closed-form rows from class statistics (shared-covariance LDA, calibrated to the old "
    "head's logit scale when the statistics cover the old classes); resolve_old=True "
    "re-solves the old rows too",
)
def _stats(ctx: InitContext) -> NewRows:
    stats = ctx.need_stats("init 'stats'")
    missing = [c for c in ctx.new_labels if c not in stats.labels]
    if missing:
        raise InputError(
            f"the statistics have no class(es) {', '.join(missing)}; collect them with "
            "`headgraft stats` on data that includes the new classes"
        )
    if stats.dim != ctx.in_features:
        raise InputError(
            f"the statistics have feature size {stats.dim} but the head reads "
            f"{ctx.in_features}; collect them from this model"
        )
    shrinkage = float(ctx.options.get("shrinkage", 0.1))
    w_all, b_all = stats.lda(shrinkage=shrinkage)  # float64, rows in stats.labels order
    pos = {c: i for i, c in enumerate(stats.labels)}
    new_idx = [pos[c] for c in ctx.new_labels]
    w_new, b_new = w_all[new_idx], b_all[new_idx]
    dev = ctx.weight.device
    if ctx.options.get("resolve_old"):
        old_missing = [c for c in ctx.old_labels if c not in pos]
        if old_missing:
            raise InputError(
                "resolve_old=True needs statistics of every old class; missing: "
                + ", ".join(old_missing[:10])
            )
        old_idx = [pos[c] for c in ctx.old_labels]
        return NewRows(
            w_new.float().to(dev), b_new.float().to(dev),
            old_weight=w_all[old_idx].float().to(dev), old_bias=b_all[old_idx].float().to(dev),
        )
    old_in = [c for c in ctx.old_labels if c in pos]
    if old_in and ctx.logits is not None:
        # fit trained_logit ~ a * lda_logit + b over the old class means (scale the LDA rows
        # into the old head's logit range, so neither side dominates)
        means = stats.means()[[pos[c] for c in old_in]]
        trained = ctx.logits(means.float().to(dev)).double().cpu()
        lda = (means @ w_all[[pos[c] for c in ctx.old_labels]].T + b_all[
            [pos[c] for c in ctx.old_labels]]).cpu()
        x = torch.stack([lda.flatten(), torch.ones(lda.numel(), dtype=torch.float64)], 1)
        a, b = torch.linalg.lstsq(x, trained.flatten()[:, None]).solution.flatten().tolist()
        if a <= 0:  # degenerate fit: fall back to matching the row norms
            a, b = ctx.mean_norm() / float(w_new.norm(dim=1).mean()), None
        return NewRows(
            (a * w_new).float().to(dev), None if b is None else (a * b_new + b).float().to(dev)
        )
    a = ctx.mean_norm() / float(w_new.norm(dim=1).mean().clamp_min(1e-12))
    return NewRows((a * w_new).float().to(dev))


# ----------------------------------------------------------------------------- bias policies


@BIASES.register("zero", "bias 0")
def _bias_zero(ctx: InitContext, rows: NewRows) -> torch.Tensor:
    return torch.zeros(ctx.k, device=ctx.weight.device)


@BIASES.register("mean", "the mean of the old biases: new classes start level with old ones")
def _bias_mean(ctx: InitContext, rows: NewRows) -> torch.Tensor:
    value = float(ctx.bias.mean()) if ctx.bias is not None else 0.0
    return torch.full((ctx.k,), value, device=ctx.weight.device)


def _new_scores(ctx: InitContext, rows: NewRows, x: torch.Tensor) -> torch.Tensor:
    w = rows.weight.to(x.device)
    if ctx.cosine_scale is not None:
        return F.linear(F.normalize(x, dim=-1), F.normalize(w, dim=-1)) * ctx.cosine_scale
    return x @ w.T


@BIASES.register(
    "silent",
    "new logits placed below every old logit on all known features (examples, class means), "
    "so predictions do not change on deploy until the new rows are trained",
)
def _bias_silent(ctx: InitContext, rows: NewRows) -> torch.Tensor:
    pools = [f for f in (ctx.features or {}).values()]
    pools += [f for f in (ctx.old_features or {}).values()]
    if ctx.stats is not None and ctx.stats.dim == ctx.in_features:
        pools.append(ctx.stats.means().float().to(ctx.weight.device))
    if not pools or ctx.logits is None:
        raise InputError(
            "bias 'silent' needs features to place the new logits below the old ones; pass "
            "examples= or stats= (CLI: --data or --stats), or choose bias 'mean'"
        )
    x = torch.cat(pools)
    gap = ctx.logits(x).min(dim=1).values[:, None] - _new_scores(ctx, rows, x)  # [N, k]
    spread = float(gap.std()) if gap.numel() > 1 else 1.0
    margin = float(ctx.options.get("margin", 1.0)) * max(spread, 1e-3)
    return gap.min(dim=0).values - margin


@BIASES.register(
    "balanced",
    "each new class wins on a share q (default 0.8) of its own examples against the old "
    "classes: a data-driven middle between taking over and vanishing; needs examples",
)
def _bias_balanced(ctx: InitContext, rows: NewRows) -> torch.Tensor:
    feats = ctx.need_features("bias 'balanced'")
    assert ctx.logits is not None
    q = float(ctx.options.get("q", 0.8))
    out = []
    for j, c in enumerate(ctx.new_labels):
        x = feats[c]
        gap = ctx.logits(x).max(dim=1).values - _new_scores(ctx, rows, x)[:, j]
        out.append(torch.quantile(gap.double().cpu(), q).float())
    return torch.stack(out).to(ctx.weight.device)


@BIASES.register(
    "prior",
    "log class prior from the statistics' counts, offset to the old biases' level",
)
def _bias_prior(ctx: InitContext, rows: NewRows) -> torch.Tensor:
    stats = ctx.need_stats("bias 'prior'")
    log_prior = stats.log_prior()
    pos = {c: i for i, c in enumerate(stats.labels)}
    missing = [c for c in ctx.new_labels if c not in pos]
    if missing:
        raise InputError(
            f"bias 'prior': the statistics have no class(es) {', '.join(missing)}; collect "
            "them on data that includes the new classes"
        )
    new_lp = log_prior[[pos[c] for c in ctx.new_labels]]
    old_in = [c for c in ctx.old_labels if c in pos]
    if ctx.bias is not None and old_in:
        b_old = ctx.bias.double().cpu()[[ctx.old_labels.index(c) for c in old_in]]
        offset = float((b_old - log_prior[[pos[c] for c in old_in]]).mean())
    else:
        base = float(ctx.bias.mean()) if ctx.bias is not None else 0.0
        offset = base - float(new_lp.mean())
    return (new_lp + offset).float().to(ctx.weight.device)
