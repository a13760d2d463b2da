"""ClassStats: additive per-class statistics, their file format, LDA and sampling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import headgraft as hg
from headgraft.data import Split
from headgraft.stats import FORMAT


def _data(
    seed: int, n: int = 60, d: int = 5, classes: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + y[:, None].double()
    return x, y


def _assert_same(a: hg.ClassStats, b: hg.ClassStats, exact: bool = False) -> None:
    assert a.labels == b.labels
    assert torch.equal(a.counts, b.counts)
    if exact:
        assert torch.equal(a.sums, b.sums) and torch.equal(a.second, b.second)
    else:
        torch.testing.assert_close(a.sums, b.sums, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.second, b.second, rtol=1e-12, atol=1e-12)


def test_update_counts_sums_and_second_moment() -> None:
    x, y = _data(0)
    s = hg.ClassStats.from_features(x, y, ["a", "b", "c"])
    assert s.counts.tolist() == [20, 20, 20] and s.total == 60 and s.dim == 5
    assert s.sums.dtype == s.second.dtype == torch.float64
    for c in range(3):
        torch.testing.assert_close(s.sums[c], x[y == c].sum(0))
        torch.testing.assert_close(s.means()[c], x[y == c].mean(0))
    torch.testing.assert_close(s.second, x.T @ x)
    # pooled within-class covariance, as numpy would compute it per class and pool
    centred = x - s.means()[y]
    torch.testing.assert_close(s.covariance(), centred.T @ centred / (60 - 3))


def test_float32_features_are_accumulated_in_float64() -> None:
    x = torch.full((1000, 2), 1e4, dtype=torch.float32) + torch.rand(1000, 2)
    s = hg.ClassStats.from_features(x, torch.zeros(1000, dtype=torch.long), ["a"])
    assert s.sums.dtype == torch.float64
    torch.testing.assert_close(s.sums[0], x.double().sum(0), rtol=1e-14, atol=0)


def test_merge_is_additive_and_equals_stats_of_the_concatenated_data() -> None:
    x1, y1 = _data(1)
    x2, y2 = _data(2, n=31)
    a = hg.ClassStats.from_features(x1, y1, ["a", "b", "c"])
    b = hg.ClassStats.from_features(x2, y2, ["a", "b", "c"])
    both = hg.ClassStats.from_features(torch.cat([x1, x2]), torch.cat([y1, y2]), ["a", "b", "c"])
    _assert_same(a.merge(b), both)
    _assert_same(b.merge(a), both)
    # streaming updates are the same thing
    _assert_same(hg.ClassStats.empty(["a", "b", "c"], 5).update(x1, y1).update(x2, y2), both)


def test_merge_takes_the_union_of_labels_in_order() -> None:
    x1, y1 = _data(1, classes=2)
    x2, y2 = _data(2, classes=2)
    a = hg.ClassStats.from_features(x1, y1, ["a", "b"])
    b = hg.ClassStats.from_features(x2, y2, ["c", "a"])  # b's class 1 is "a"
    m = a.merge(b)
    assert m.labels == ["a", "b", "c"]
    assert m.counts.tolist() == [60, 30, 30]
    torch.testing.assert_close(m.sums[0], x1[y1 == 0].sum(0) + x2[y2 == 1].sum(0))
    torch.testing.assert_close(m.sums[2], x2[y2 == 0].sum(0))


def test_save_load_round_trip_is_exact_safetensors_with_json_metadata(tmp_path) -> None:
    x, y = _data(3)
    s = hg.ClassStats.from_features(x, y, ["cat", "dog", "émile"])
    path = tmp_path / "stats.safetensors"
    s.save(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"counts", "sums", "second"}
        assert f.get_tensor("sums").dtype == torch.float64
    assert meta["format"] == FORMAT
    assert json.loads(meta["labels"]) == ["cat", "dog", "émile"]
    again = hg.ClassStats.load(path)
    _assert_same(again, s, exact=True)
    assert again.counts.dtype == torch.int64
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left over


def test_load_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(hg.InputError, match="does not exist; make one with `headgraft stats"):
        hg.ClassStats.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(hg.InputError, match="not a readable safetensors file"):
        hg.ClassStats.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(hg.InputError, match="not a headgraft statistics file"):
        hg.ClassStats.load(other)


def test_collect_reads_the_head_input(digits_base: nn.Module, digits_split: Split) -> None:
    x, y = digits_split.select(list(range(7)))
    s = hg.ClassStats.collect(digits_base, (x, y), batch_size=100)
    assert s.labels == [str(i) for i in range(7)]  # the model's label names
    with torch.no_grad():
        f = digits_base[:-1](x)
    want = hg.ClassStats.from_features(f, y, s.labels)
    _assert_same(s, want)
    # names as labels, collected in order of appearance
    names = [f"d{int(c)}" for c in y]
    by_name = hg.ClassStats.collect(digits_base, (x, names))
    assert by_name.labels == list(dict.fromkeys(names))
    assert by_name.total == len(y)


def test_collect_with_labels_beyond_the_model(digits_base: nn.Module, digits_split: Split) -> None:
    x, y = digits_split.x_train[:200], digits_split.y_train[:200]  # digits 0-9, model knows 0-6
    s = hg.ClassStats.collect(digits_base, (x, y))
    assert s.labels == [str(i) for i in range(10)]
    assert s.total == 200


def test_lda_classifies_separable_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    d, per = 6, 200
    centres = torch.randn(4, d, generator=g, dtype=torch.float64) * 3
    y = torch.arange(4).repeat_interleave(per)
    x = centres[y] + torch.randn(len(y), d, generator=g, dtype=torch.float64)
    s = hg.ClassStats.from_features(x, y, list("abcd"))
    w, b = s.lda(shrinkage=0.0)
    xt = centres[y] + torch.randn(len(y), d, generator=g, dtype=torch.float64)
    acc = float(((xt @ w.T + b).argmax(1) == y).double().mean())
    assert acc > 0.95, acc


def test_lda_and_sample_refuse_empty_classes() -> None:
    s = hg.ClassStats.empty(["a", "b"], 3)
    s.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(hg.InputError, match="no examples of class.*b.*collect data"):
        s.lda()


def test_sample_has_the_class_means_and_shared_covariance() -> None:
    x, y = _data(4, n=300, d=3)
    x = x @ torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]], dtype=torch.float64)
    s = hg.ClassStats.from_features(x, y, ["a", "b", "c"])
    g = torch.Generator().manual_seed(0)
    z, t = s.sample(20000, ["c", "a"], shrinkage=0.0, generator=g)
    assert z.dtype == torch.float32 and z.shape == (40000, 3)
    assert t.tolist()[:1] == [0] and t.tolist()[-1] == 1
    for j, c in enumerate([2, 0]):
        torch.testing.assert_close(z[t == j].double().mean(0), s.means()[c], atol=0.05, rtol=0)
        zc = z[t == j].double()
        cov = (zc - zc.mean(0)).T @ (zc - zc.mean(0)) / (len(zc) - 1)
        torch.testing.assert_close(cov, s.covariance(), atol=0.08, rtol=0.05)


def test_shrinkage_keeps_the_trace() -> None:
    x, y = _data(5)
    s = hg.ClassStats.from_features(x, y, ["a", "b", "c"])
    c0, c1 = s.covariance(0.0), s.covariance(0.5)
    torch.testing.assert_close(torch.trace(c0), torch.trace(c1))
    torch.testing.assert_close(
        c1 - torch.diag(torch.diag(c1)), 0.5 * (c0 - torch.diag(torch.diag(c0)))
    )


def test_subset_keeps_means_and_counts() -> None:
    x, y = _data(6)
    s = hg.ClassStats.from_features(x, y, ["a", "b", "c"])
    sub = s.subset(["c", "a"])
    assert sub.labels == ["c", "a"] and sub.counts.tolist() == [20, 20]
    torch.testing.assert_close(sub.means(), s.means()[[2, 0]])


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda s: s.update(torch.randn(2, 4), torch.tensor([0, 1])), "size 4 but.*same model"),
        (lambda s: s.update(torch.randn(2, 5), torch.tensor([0, 7])), "outside the statistics"),
        (lambda s: s.merge(hg.ClassStats.empty(["a"], 4)), "feature size 5 and 4"),
    ],
    ids=["dim", "target", "merge-dim"],
)
def test_stats_errors(call, pattern: str) -> None:
    s = hg.ClassStats.empty(["a", "b", "c"], 5)
    with pytest.raises(hg.InputError, match=pattern):
        call(s)


def test_inconsistent_shapes_are_refused() -> None:
    with pytest.raises(hg.InputError, match="inconsistent"):
        hg.ClassStats(["a"], torch.zeros(2), torch.zeros(2, 3), torch.zeros(3, 3))
