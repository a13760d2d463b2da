"""add_classes / remove_classes / fuse / split on bare heads: properties over shapes, dtypes,
layer kinds and layouts (hypothesis), hooks and parametrizations, and every bad input."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import headgraft as hg
from headgraft.graft import full_rows, leaf

KINDS = ("linear", "conv1x1", "cosine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FAST = settings(max_examples=100, deadline=None)


def make_head(kind: str, d: int, n: int, bias: bool, dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        head: nn.Module = nn.Linear(d, n, bias=bias)
    elif kind == "conv1x1":
        head = nn.Conv2d(d, n, 1, bias=bias)
    else:
        head = hg.CosineLinear(d, n, bias=bias, scale=10.0)
        if bias:
            nn.init.uniform_(head.bias, -1, 1)
    return head.to(dtype)


def make_inputs(kind: str, d: int, dtype: torch.dtype, seed: int, n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, d, 2, 3) if kind == "conv1x1" else (n, d)
    return torch.randn(*shape, generator=g).to(dtype)


def class_dim(kind: str) -> int:
    return 1 if kind == "conv1x1" else -1


def old_block(y: torch.Tensor, kind: str, n: int) -> torch.Tensor:
    return y.narrow(class_dim(kind), 0, n)


def assert_rounding_close(
    got: torch.Tensor, want: torch.Tensor, head: nn.Module, x: torch.Tensor, kind: str
) -> None:
    """``got`` equals ``want`` up to the rounding of one dot product per logit.

    The bound is a few units in the last place of the dtype times the sum of the absolute
    terms of each dot product (for cosine heads, of the normalised inputs and rows), which is
    how far two summation orders of the same products can drift apart.
    """
    w, b = full_rows(head)
    n = want.shape[class_dim(kind)]
    w = w[:n].reshape(n, -1).double()
    xx = x.movedim(1, -1) if kind == "conv1x1" else x
    xx = xx.double()
    if kind == "cosine":
        w = nn.functional.normalize(w, dim=-1)
        xx = nn.functional.normalize(xx, dim=-1) * float(head.scale.detach())
    mag = xx.abs() @ w.abs().T
    if b is not None:
        mag = mag + b[:n].double().abs()
    if kind == "conv1x1":
        mag = mag.movedim(-1, 1)
    eps = torch.finfo(want.dtype).eps
    err = (got.double() - want.double()).abs()
    assert (err <= 4 * eps * mag + 4 * eps * want.double().abs()).all(), float(err.max())


# ----------------------------------------------------------------------------- properties


@FAST
@given(
    kind=st.sampled_from(KINDS),
    d=st.integers(1, 48),
    n=st.integers(1, 12),
    k=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    layout=st.sampled_from(["fused", "split"]),
    init=st.sampled_from(["zeros", "random", "mean", "copy", "imprint"]),
    frozen=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grow_keeps_old_rows_logits_dtype_and_grad(
    kind: str,
    d: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    bias: bool,
    layout: str,
    init: str,
    frozen: bool,
    seed: int,
) -> None:
    head = make_head(kind, d, n, bias, dtype, seed)
    if frozen:
        head.weight.requires_grad_(False)
    w0, b0 = (t.detach().clone() if t is not None else None for t in full_rows(head))
    x = make_inputs(kind, d, dtype, seed)
    with torch.no_grad():
        ref = head(x)
    new = [f"new{i}" for i in range(k)]
    kw: dict[str, Any] = {}
    if init == "copy":
        kw["init_options"] = {"source": str(n - 1)}
    if init == "imprint":
        ex = make_inputs(kind, d, dtype, seed + 1, n=2 * k)
        kw["examples"] = (ex, [c for c in new for _ in range(2)])

    grown = hg.add_classes(head, new, init=init, seed=seed, layout=layout, **kw)

    w, b = full_rows(grown)
    assert w.shape[0] == n + k and w.shape[1:] == w0.shape[1:]
    assert w.dtype == dtype and w.device == w0.device
    assert torch.equal(w[:n], w0)
    assert torch.isfinite(w.float()).all()
    assert (b is None) == (b0 is None)
    if b is not None:
        assert torch.equal(b[:n], b0) and b.dtype == dtype
    first = leaf(grown) if layout == "split" else grown
    assert first.weight.requires_grad is (not frozen)
    if layout == "split":
        assert isinstance(grown, hg.SplitHead) and grown.old is head
        assert grown.new.weight.requires_grad is (not frozen)
    with torch.no_grad():
        out = grown(x)
    assert out.shape[class_dim(kind)] == n + k and out.dtype == dtype
    if layout == "split":
        assert torch.equal(old_block(out, kind, n), ref)
    else:
        assert_rounding_close(old_block(out, kind, n), ref, grown, x, kind)
    assert hg.labels(grown).names == [str(i) for i in range(n)] + new

    # shrinking back gives the original rows and bit-identical old logits
    back = hg.remove_classes(grown, new)
    bw, bb = full_rows(back)
    assert torch.equal(bw, w0) and (bb is None or torch.equal(bb, b0))
    with torch.no_grad():
        assert torch.equal(back(x), ref)
    assert hg.labels(back).names == [str(i) for i in range(n)]


@FAST
@given(
    kind=st.sampled_from(KINDS),
    d=st.integers(1, 32),
    n=st.integers(1, 8),
    k1=st.integers(1, 4),
    k2=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nested_split_keeps_every_older_block_and_fuse_split_round_trip(
    kind: str, d: int, n: int, k1: int, k2: int, dtype: torch.dtype, bias: bool, seed: int
) -> None:
    head = make_head(kind, d, n, bias, dtype, seed)
    x = make_inputs(kind, d, dtype, seed)
    with torch.no_grad():
        r0 = head(x)
        g1 = hg.add_classes(head, [f"a{i}" for i in range(k1)], seed=seed, layout="split")
        r1 = g1(x)
        g2 = hg.add_classes(g1, [f"b{i}" for i in range(k2)], seed=seed, layout="split")
        r2 = g2(x)
    assert torch.equal(old_block(r1, kind, n), r0)
    assert torch.equal(old_block(r2, kind, n), r0)
    assert torch.equal(old_block(r2, kind, n + k1), r1)
    assert leaf(g2) is head
    rows = full_rows(g2)

    fused = hg.fuse(g2)
    assert not isinstance(fused, hg.SplitHead)
    assert type(fused) is type(head)
    fw, fb = full_rows(fused)
    assert torch.equal(fw, rows[0]) and (fb is None or torch.equal(fb, rows[1]))
    assert hg.labels(fused) == hg.labels(g2)
    with torch.no_grad():
        assert_rounding_close(fused(x), r2, fused, x, kind)

    again = hg.split(fused, n)
    sw, sb = full_rows(again)
    assert torch.equal(sw, rows[0]) and (sb is None or torch.equal(sb, rows[1]))
    with torch.no_grad():
        assert torch.equal(old_block(again(x), kind, n), r0)

    # removing the newest block of a nested split gives back the inner split head
    inner = hg.remove_classes(g2, [f"b{i}" for i in range(k2)])
    assert inner is g1
    with torch.no_grad():
        assert torch.equal(inner(x), r1)


@FAST
@given(
    d=st.integers(2, 32),
    n=st.integers(2, 10),
    drop=st.data(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_remove_any_subset_keeps_the_rest_bit_for_bit(
    d: int, n: int, drop: st.DataObject, dtype: torch.dtype, seed: int
) -> None:
    head = make_head("linear", d, n, True, dtype, seed)
    gone = drop.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1))
    keep = [i for i in range(n) if i not in gone]
    x = make_inputs("linear", d, dtype, seed)
    with torch.no_grad():
        ref = head(x)
    shrunk = hg.remove_classes(head, [str(i) for i in sorted(gone)])
    assert torch.equal(shrunk.weight, head.weight[keep])
    assert torch.equal(shrunk.bias, head.bias[keep])
    assert shrunk.out_features == len(keep)
    assert hg.labels(shrunk).names == [str(i) for i in keep]
    if len(keep) > 0:
        with torch.no_grad():
            assert_rounding_close(shrunk(x), ref[:, keep], shrunk, x, "linear")


# ----------------------------------------------------------------------------- in a model


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_hooks_on_the_head_survive_and_their_handles_still_work(layout: str) -> None:
    model = mlp()
    seen: list[str] = []
    fwd = model[2].register_forward_hook(lambda m, i, o: seen.append(f"fwd{o.shape[-1]}"))
    pre = model[2].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    x = torch.randn(3, 6)
    hg.add_classes(model, ["x", "y"], seed=0, layout=layout)
    model(x)
    assert seen == ["pre", "fwd6"]
    fwd.remove()
    seen.clear()
    model(x)
    assert seen == ["pre"]
    hg.remove_classes(model, ["x", "y"])  # hooks follow the head back too
    seen.clear()
    model(x)
    assert seen == ["pre"]
    pre.remove()
    seen.clear()
    model(x)
    assert seen == []


def test_hook_fires_on_the_fused_head_after_fuse() -> None:
    model = mlp()
    seen: list[int] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    hg.add_classes(model, ["x"], seed=0, layout="split")
    hg.fuse(model)
    model(torch.randn(2, 6))
    assert seen == [5]


def test_parametrized_head_is_refused_naming_remove_parametrizations() -> None:
    model = mlp()
    model[2] = weight_norm(model[2])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(hg.UnsupportedHeadError, match="remove_parametrizations"):
        hg.add_classes(model, ["x"])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_grad_and_training_flow_through_grown_head() -> None:
    model = mlp()
    hg.add_classes(model, ["x"], seed=0, layout="split")
    loss = nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 4, 4, 1]))
    loss.backward()
    assert model[2].new.weight.grad is not None and model[2].old.weight.grad is not None


def test_cosine_split_blocks_share_the_scale_and_fuse_keeps_it() -> None:
    head = hg.CosineLinear(5, 3, scale=7.0)
    grown = hg.add_classes(head, ["x"], seed=0, layout="split")
    assert grown.old.scale is grown.new.scale is head.scale
    fused = hg.fuse(grown)
    assert isinstance(fused, hg.CosineLinear) and fused.scale is head.scale
    assert fused.out_features == 4


# ----------------------------------------------------------------------------- bad inputs


class TwoOutputs(nn.Module):
    """A model returning two linear outputs: no single head can be guessed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def _add(labels: Any, **kw: Any) -> Callable[[nn.Module], Any]:
    return lambda m: hg.add_classes(m, labels, **kw)


X8 = (torch.randn(4, 6), ["x", "x", "y", "y"])

# (id, model factory, call, exception, message pattern that names the fix)
BAD = [
    ("duplicate-new", mlp, _add(["x", "x"]), hg.LabelError, "more than once.*distinct"),
    ("existing", mlp, _add(["2"]), hg.LabelError, "already exist.*choose new names"),
    ("empty", mlp, _add([]), hg.LabelError, "empty; pass at least one"),
    ("string-not-list", mlp, _add("cat"), hg.LabelError, r"pass \['cat'\]"),
    (
        "unknown-removal",
        mlp,
        lambda m: hg.remove_classes(m, ["zebra"]),
        hg.LabelError,
        "unknown label 'zebra'.*labels are: 0, 1, 2, 3",
    ),
    (
        "remove-all",
        mlp,
        lambda m: hg.remove_classes(m, ["0", "1", "2", "3"]),
        hg.LabelError,
        "at least one label left",
    ),
    (
        "unknown-init",
        mlp,
        _add(["x"], init="imprnt"),
        hg.InputError,
        "unknown init 'imprnt'; choose one of: zeros, random, copy, mean, imprint, stats",
    ),
    (
        "unknown-bias",
        mlp,
        _add(["x"], bias="silnt"),
        hg.InputError,
        "unknown bias policy 'silnt'; choose one of: zero, mean, silent",
    ),
    (
        "unknown-layout",
        mlp,
        _add(["x"], layout="stacked"),
        hg.InputError,
        "choose one of: fused, split",
    ),
    (
        "unknown-distribution",
        mlp,
        _add(["x"], init_options={"distribution": "cauchy"}),
        hg.InputError,
        "choose one of: kaiming_uniform, xavier_uniform, normal",
    ),
    (
        "imprint-without-examples",
        mlp,
        _add(["x"], init="imprint"),
        hg.InputError,
        "^init 'imprint' needs examples of the new classes; pass examples=",
    ),
    (
        "imprint-missing-class",
        mlp,
        _add(["x", "y", "z"], init="imprint", examples=X8),
        hg.InputError,
        "^init 'imprint': the examples have none of class.*z.*add at least one example",
    ),
    (
        "stats-without-stats",
        mlp,
        _add(["x"], init="stats"),
        hg.InputError,
        "needs class statistics; pass stats=",
    ),
    (
        "prior-without-stats",
        mlp,
        _add(["x"], bias="prior"),
        hg.InputError,
        "needs class statistics; pass stats=",
    ),
    (
        "silent-without-features",
        mlp,
        _add(["x"], bias="silent"),
        hg.InputError,
        "pass examples= or stats=",
    ),
    (
        "copy-unknown-source",
        mlp,
        _add(["x"], init="copy", init_options={"source": "cat"}),
        hg.InputError,
        "copy source 'cat' is not an existing class; choose one of: 0, 1, 2, 3",
    ),
    (
        "balanced-without-examples",
        mlp,
        _add(["x"], bias="balanced"),
        hg.InputError,
        "^bias 'balanced' needs examples of the new classes; pass examples=",
    ),
    ("copy-without-source", mlp, _add(["x"], init="copy"), hg.InputError, "needs a source class"),
    (
        "example-label-unknown",
        mlp,
        _add(["x"], examples=(torch.randn(2, 6), ["x", "q"])),
        hg.LabelError,
        "label 'q'.*add it to the new labels or drop",
    ),
    (
        "example-count-mismatch",
        mlp,
        _add(["x"], examples=(torch.randn(3, 6), ["x"])),
        hg.InputError,
        "3 inputs but 1 labels",
    ),
    (
        "path-not-a-head",
        mlp,
        _add(["x"], head="1"),
        hg.HeadNotFoundError,
        "not a classification head.*did you mean '2'",
    ),
    ("path-missing", mlp, _add(["x"], head="9"), hg.HeadNotFoundError, "has no module '9'"),
    ("ambiguous", TwoOutputs, _add(["x"]), hg.AmbiguousHeadError, "pass path="),
    (
        "no-bias-silent",
        lambda: nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4, bias=False)),
        _add(["x", "y"], bias="silent", examples=X8),
        hg.UnsupportedHeadError,
        "has no bias.*bias='auto'",
    ),
    ("split-point", mlp, lambda m: hg.split(m, 4), hg.InputError, "between 1 and 3"),
    (
        "resolve-old-split",
        mlp,
        lambda m: hg.add_classes(
            m,
            ["x", "y"],
            init="stats",
            layout="split",
            init_options={"resolve_old": True},
            stats=hg.ClassStats.from_features(
                torch.randn(12, 8), torch.arange(12) % 6, ["0", "1", "2", "3", "x", "y"]
            ),
        ),
        hg.InputError,
        "use layout='fused'",
    ),
]


@pytest.mark.parametrize(
    ("factory", "call", "exc", "pattern"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_input_raises_own_error_naming_the_fix_and_changes_nothing(
    factory: Callable[[], nn.Module],
    call: Callable[[nn.Module], Any],
    exc: type,
    pattern: str,
) -> None:
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    labels_before = getattr(model, "headgraft_labels", None)
    with pytest.raises(exc, match=pattern) as info:
        call(model)
    assert isinstance(info.value, hg.HeadgraftError)
    assert "\n" not in str(info.value)  # one line, for the command line
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(model, "headgraft_labels", None) == labels_before


def test_timm_model_without_classifier_names_reset_classifier() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(hg.HeadNotFoundError, match=r"num_classes=0.*reset_classifier\(N\)"):
        hg.add_classes(model, ["x"])


def test_head_path_hint_names_the_inner_head() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Dropout(), nn.Linear(8, 3)))
    with pytest.raises(hg.HeadNotFoundError, match=r"did you mean '2\.1'\?"):
        hg.find_head(model, "2")


def test_non_finite_head_is_refused() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(hg.InputError, match="NaN or Inf"):
        hg.add_classes(model, ["x"])


@pytest.mark.parametrize("bias", ["silent", "prior", "balanced", "mean"])
def test_bias_policy_needing_a_bias_is_refused_on_a_head_without_one(bias: str) -> None:
    head = nn.Linear(6, 4, bias=False)
    stats = hg.ClassStats.from_features(
        torch.randn(10, 6), torch.arange(10) % 5, ["0", "1", "2", "3", "x"]
    )
    with pytest.raises(hg.UnsupportedHeadError, match=f"no bias, so bias policy '{bias}'"):
        hg.add_classes(
            head, ["x"], bias=bias, stats=stats, examples=(torch.randn(2, 6), ["x", "x"])
        )
    assert hg.add_classes(head, ["x"], bias="zero", seed=0).bias is None


def test_a_failure_on_the_second_head_leaves_every_head_unchanged() -> None:
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=4, img_size=32
    )
    with torch.no_grad():
        model.head_dist.weight[0, 0] = float("inf")
    head, seen = model.head, []
    model.head.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    with pytest.raises(hg.InputError, match="'head_dist' contains NaN or Inf"):
        hg.add_classes(model, ["x"], layout="split")
    assert model.head is head and model.head.out_features == 4
    assert model.num_classes == 4 and hg.labels(model).names == ["0", "1", "2", "3"]
    model.eval()(torch.randn(1, 3, 32, 32))
    assert seen == [4]  # the hook is still on the head
