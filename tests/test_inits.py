"""The initialisers and bias policies: each does what its registry description says, and
imprinting works on real data (an MLP trained on digits 0-6 in the test, 7-9 grafted on)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import headgraft as hg
from headgraft.data import Split
from headgraft.inits import InitContext

NEW = ["7", "8", "9"]
IN = 128  # the MLP's penultimate width
OLD = 7


def _grow(base: nn.Module, **kw) -> nn.Module:
    model = copy.deepcopy(base)
    kw.setdefault("seed", 0)
    hg.add_classes(model, NEW, **kw)
    return model


def _head(model: nn.Module) -> nn.Linear:
    return model[-1]


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


@torch.no_grad()
def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model[:-1](x)


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean())


@pytest.fixture(scope="module")
def full_stats(digits_base: nn.Module, digits_split: Split) -> hg.ClassStats:
    """Statistics of the head's input over the whole training split, all ten digits."""
    names = [str(int(c)) for c in digits_split.y_train]
    return hg.ClassStats.collect(
        digits_base, (digits_split.x_train, names), labels=[str(i) for i in range(10)]
    )


# ----------------------------------------------------------------------------- real data


def test_base_model_learned_the_old_digits(digits_base: nn.Module, digits_split: Split) -> None:
    x, y = digits_split.select(list(range(OLD)), "test")
    assert _accuracy(_predict(digits_base, x), y) > 0.9


def test_imprint_from_ten_shots_recognises_new_digits_without_training(
    digits_base: nn.Module, digits_split: Split, digits_shots: tuple[torch.Tensor, torch.Tensor]
) -> None:
    before = [p.detach().clone() for p in digits_base.parameters()]
    # level biases (the imprinted-weights paper's setting): new digits are recognised ...
    model = _grow(digits_base, init="imprint", bias="mean", examples=digits_shots)
    x, y = digits_split.select([7, 8, 9], "test")
    acc = _accuracy(_predict(model, x), y)
    assert acc > 0.5, acc
    # ... and the default bias ('balanced' for imprint) keeps the old digits as well
    model = _grow(digits_base, init="imprint", examples=digits_shots)
    xo, yo = digits_split.select(list(range(OLD)), "test")
    assert _accuracy(_predict(model, xo), yo) > 0.8
    assert _accuracy(_predict(model, x), y) > 0.3
    # no gradient step anywhere: the base model and the grown old rows are untouched
    assert all(torch.equal(a, b) for a, b in zip(before, digits_base.parameters()))
    assert torch.equal(_head(model).weight[:OLD], _head(digits_base).weight)


def test_imprint_with_silent_bias_leaves_old_predictions_unchanged(
    digits_base: nn.Module, digits_split: Split, digits_shots: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = _grow(digits_base, init="imprint", bias="silent", examples=digits_shots)
    x_old, _ = digits_split.select(list(range(OLD)), "test")
    assert torch.equal(_predict(model, x_old), _predict(digits_base, x_old))
    # new classes stay silent on the new digits' test images too, until trained
    x_new, _ = digits_split.select([7, 8, 9], "test")
    assert torch.equal(_predict(model, x_new), _predict(digits_base, x_new))


def test_stats_init_covering_old_classes_beats_chance_on_new_digits(
    digits_base: nn.Module, digits_split: Split, full_stats: hg.ClassStats
) -> None:
    model = _grow(digits_base, init="stats", stats=full_stats)
    x, y = digits_split.select([7, 8, 9], "test")
    new_acc = _accuracy(_predict(model, x), y)
    x_old, y_old = digits_split.select(list(range(OLD)), "test")
    old_acc = _accuracy(_predict(model, x_old), y_old)
    assert new_acc > 0.3, new_acc  # chance among ten digits is 0.1
    assert old_acc > 0.8, old_acc  # calibrated to the old logit scale: old classes survive


def test_stats_resolve_old_rows_only_when_asked(
    digits_base: nn.Module, digits_split: Split, full_stats: hg.ClassStats
) -> None:
    kept = _grow(digits_base, init="stats", stats=full_stats)
    assert torch.equal(_head(kept).weight[:OLD], _head(digits_base).weight)
    assert torch.equal(_head(kept).bias[:OLD], _head(digits_base).bias)

    resolved = _grow(
        digits_base, init="stats", stats=full_stats, init_options={"resolve_old": True}
    )
    w_lda, b_lda = full_stats.lda(shrinkage=0.1)
    torch.testing.assert_close(_head(resolved).weight, w_lda.float())
    torch.testing.assert_close(_head(resolved).bias, b_lda.float())
    assert not torch.equal(_head(resolved).weight[:OLD], _head(digits_base).weight)
    # the re-solved head is the LDA classifier of all ten digits
    assert _accuracy(_predict(resolved, digits_split.x_test), digits_split.y_test) > 0.85


def test_copy_without_source_picks_the_old_class_the_examples_score_highest(
    digits_base: nn.Module, digits_shots: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = digits_shots
    model = _grow(digits_base, init="copy", examples=digits_shots, init_options={"noise": 0.0})
    w = _head(model).weight
    with torch.no_grad():
        for j, c in enumerate([7, 8, 9]):
            src = int(digits_base(x[y == c]).mean(0).argmax())
            assert torch.equal(w[OLD + j], w[src])
            assert _head(model).bias[OLD + j] == _head(digits_base).bias[src]


# ----------------------------------------------------------------------------- each init


def test_every_init_and_bias_is_documented() -> None:
    assert set(hg.INITS.names()) >= {"zeros", "random", "copy", "mean", "imprint", "stats"}
    assert set(hg.BIASES.names()) >= {"zero", "mean", "silent", "prior"}
    for reg in (hg.INITS, hg.BIASES):
        for name, text in reg.describe().items():
            assert len(text) > 5, name


def test_zeros_rows_are_zero(digits_base: nn.Module) -> None:
    w = _head(_grow(digits_base, init="zeros")).weight
    assert torch.equal(w[OLD:], torch.zeros(3, IN))


def test_random_kaiming_bound_uses_in_features(digits_base: nn.Module) -> None:
    base = nn.Sequential(nn.Linear(4, IN), nn.Linear(IN, OLD))
    grown = copy.deepcopy(base)
    many = [f"n{i}" for i in range(200)]
    hg.add_classes(grown, many, init="random", seed=0)
    new = grown[-1].weight[OLD:].detach()
    bound = 1 / math.sqrt(IN)  # nn.Linear's default bound for this fan_in
    assert new.abs().max() <= bound
    assert new.abs().max() > 0.99 * bound  # not a smaller bound (fan from the new total)
    # uniform on [-b, b]: std b/sqrt(3)
    assert abs(float(new.std()) - bound / math.sqrt(3)) < 0.02 * bound


def test_random_xavier_uses_in_features_plus_total(digits_base: nn.Module) -> None:
    w = _head(
        _grow(digits_base, init="random", init_options={"distribution": "xavier_uniform"})
    ).weight[OLD:]
    bound = math.sqrt(6 / (IN + OLD + 3))
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.95 * bound


def test_random_normal_matches_the_old_rows_spread(digits_base: nn.Module) -> None:
    head = nn.Linear(IN, OLD)
    grown = hg.add_classes(
        copy.deepcopy(head),
        [f"n{i}" for i in range(300)],
        init="random",
        init_options={"distribution": "normal"},
        seed=0,
    )
    new = grown.weight[OLD:].detach()
    assert abs(float(new.std()) / float(head.weight.detach().std()) - 1) < 0.02
    assert abs(float(new.mean()) - float(head.weight.detach().mean())) < 0.01 * float(
        head.weight.detach().std()
    )


def test_random_is_reproducible_with_a_seed(digits_base: nn.Module) -> None:
    a = _head(_grow(digits_base, init="random", seed=3)).weight
    b = _head(_grow(digits_base, init="random", seed=3)).weight
    c = _head(_grow(digits_base, init="random", seed=4)).weight
    assert torch.equal(a, b) and not torch.equal(a[OLD:], c[OLD:])


def test_copy_rows_are_close_to_the_source_but_do_not_tie(digits_base: nn.Module) -> None:
    model = _grow(digits_base, init="copy", init_options={"source": "1"})
    w, b = _head(model).weight, _head(model).bias
    src = _head(digits_base).weight[1]
    for j in range(OLD, OLD + 3):
        diff = (w[j] - src).norm() / src.norm()
        assert 0 < diff < 0.05, float(diff)
        assert b[j] == _head(digits_base).bias[1]  # auto bias: the source's own
    assert not torch.equal(w[OLD], w[OLD + 1])  # copies of one source differ
    assert w[OLD].data_ptr() != src.data_ptr()  # and are no views of it


def test_copy_source_mapping_per_new_label(digits_base: nn.Module) -> None:
    model = _grow(
        digits_base,
        init="copy",
        init_options={"source": {"7": "1", "8": "3", "9": "0"}, "noise": 0.0},
    )
    w = _head(model).weight
    for j, s in enumerate([1, 3, 0]):
        assert torch.equal(w[OLD + j], _head(digits_base).weight[s])


def test_mean_rows_sit_at_the_mean_of_old_rows(digits_base: nn.Module) -> None:
    w = _head(_grow(digits_base, init="mean")).weight
    mu = _head(digits_base).weight.mean(0)
    spread = (_head(digits_base).weight - mu).norm(dim=1).mean()
    for j in range(OLD, OLD + 3):
        assert (w[j] - mu).norm() < 0.2 * spread
    assert not torch.equal(w[OLD], w[OLD + 1])


def test_imprint_rows_are_normalised_class_means_at_the_old_norm(
    digits_base: nn.Module, digits_shots: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = digits_shots
    w = _head(_grow(digits_base, init="imprint", examples=digits_shots)).weight[OLD:]
    old_norm = _head(digits_base).weight.norm(dim=1).mean()
    torch.testing.assert_close(w.norm(dim=1), old_norm.expand(3))
    f = _features(digits_base, x)
    for j, c in enumerate([7, 8, 9]):
        direction = nn.functional.normalize(
            nn.functional.normalize(f[y == c], dim=1).mean(0), dim=0
        )
        torch.testing.assert_close(w[j] / w[j].norm(), direction)


def test_imprint_on_a_cosine_head_uses_unit_rows() -> None:
    torch.manual_seed(0)
    head = hg.CosineLinear(8, 3, scale=10.0)
    x = torch.randn(6, 8)
    grown = hg.add_classes(
        head, ["a", "b"], init="imprint", examples=(x, ["a", "a", "a", "b", "b", "b"])
    )
    torch.testing.assert_close(grown.weight[3:].norm(dim=1), torch.ones(2))
    with torch.no_grad():
        scores = grown(x)[:, 3:]
    assert (scores.argmax(1) == torch.tensor([0, 0, 0, 1, 1, 1])).float().mean() > 0.6


# ----------------------------------------------------------------------------- biases


def test_zero_and_mean_bias(digits_base: nn.Module) -> None:
    b0 = _head(_grow(digits_base, init="zeros", bias="zero")).bias
    assert torch.equal(b0[OLD:], torch.zeros(3))
    bm = _head(_grow(digits_base, init="zeros", bias="mean")).bias
    torch.testing.assert_close(bm[OLD:], _head(digits_base).bias.mean().expand(3))


def test_silent_bias_puts_new_logits_below_every_old_logit_on_known_features(
    digits_base: nn.Module, digits_shots: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = _grow(digits_base, init="imprint", bias="silent", examples=digits_shots)
    with torch.no_grad():
        out = model(digits_shots[0])
    assert (out[:, OLD:].max(1).values < out[:, :OLD].min(1).values).all()


def test_balanced_bias_lets_each_new_class_win_on_most_of_its_examples(
    digits_base: nn.Module, digits_shots: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = digits_shots
    model = _grow(digits_base, init="imprint", bias="balanced", examples=digits_shots)
    with torch.no_grad():
        out = model(x)
    for j, c in enumerate([7, 8, 9]):
        o = out[y == c]
        wins = (o[:, OLD + j] > o[:, :OLD].max(1).values).float().mean()
        assert 0.6 <= float(wins) <= 0.9, (c, float(wins))


def test_prior_bias_follows_log_class_priors(digits_base: nn.Module) -> None:
    d = IN
    counts = [50, 40, 30, 30, 20, 20, 10, 40, 10, 5]
    targets = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    feats = torch.randn(len(targets), d)
    stats = hg.ClassStats.from_features(feats, targets, [str(i) for i in range(10)])
    b = _head(_grow(digits_base, init="zeros", bias="prior", stats=stats)).bias.double()
    log_p = torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts))
    # differences between new biases are differences of log priors
    torch.testing.assert_close(b[OLD:] - b[OLD], log_p[OLD:] - log_p[OLD], rtol=0, atol=1e-5)
    # on the old biases' level: offset = mean(old bias - old log prior)
    offset = (_head(digits_base).bias.double() - log_p[:OLD]).mean()
    torch.testing.assert_close(b[OLD:], log_p[OLD:] + offset, rtol=0, atol=1e-5)


def test_init_context_reports_norms() -> None:
    ctx = InitContext(
        weight=torch.ones(3, 4),
        bias=None,
        old_labels=["a", "b", "c"],
        new_labels=["d"],
        num_total=4,
    )
    rows = hg.INITS.get("zeros")(ctx)
    rep = rows.report(ctx.weight)
    assert rep["old_norm_mean"] == 2.0 and rep["new_norm_max"] == 0.0
    # noise scale never vanishes, even when every old row is the same
    assert ctx.spread() == 0.5
