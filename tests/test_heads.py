"""One table row per real model family (torchvision, timm, transformers), each checked for the
same properties: head found, every initialiser works, old rows and old logits kept, labels in
step, fuse/split lossless, and remove_classes undoing add_classes exactly.

Models are built without downloads (random weights, tiny configs), once per module, and every
test grafts a ``copy.deepcopy`` of the built model.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
import transformers
from torch import nn
from torchvision import models as tvm

import headgraft as hg
from headgraft.features import forward, logits_of
from headgraft.graft import full_rows
from headgraft.heads import get_module

NUM_CLASSES = 7
NEW = ["new_a", "new_b", "new_c"]
SHOTS = 2  # examples per new class


def _images(size: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    def make(n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 3, size, size, generator=g)

    return make


def _tokens(vocab: int) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    """Right-padded token batches (pad id 0 only at the end), every second row shorter."""

    def make(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, vocab, (n, 6), generator=g)
        mask = torch.ones(n, 6, dtype=torch.long)
        mask[1::2, 4:] = 0
        return {"input_ids": ids * mask, "attention_mask": mask}

    return make


_TINY_TEXT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "max_position_embeddings": 40,
}


def _bert(n: int) -> nn.Module:
    cfg = transformers.BertConfig(**_TINY_TEXT, num_labels=n)
    return transformers.BertForSequenceClassification(cfg)


def _roberta(n: int) -> nn.Module:
    cfg = transformers.RobertaConfig(**_TINY_TEXT, pad_token_id=0, num_labels=n)
    return transformers.RobertaForSequenceClassification(cfg)


def _llama(n: int) -> nn.Module:
    cfg = transformers.LlamaConfig(
        **_TINY_TEXT, num_key_value_heads=2, pad_token_id=0, num_labels=n
    )
    return transformers.LlamaForSequenceClassification(cfg)


def _distilbert(n: int) -> nn.Module:
    cfg = transformers.DistilBertConfig(
        vocab_size=99,
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=37,
        max_position_embeddings=40,
        num_labels=n,
    )
    return transformers.DistilBertForSequenceClassification(cfg)


def _timm(name: str, **kw: Any) -> Callable[[int], nn.Module]:
    return lambda n: timm.create_model(name, pretrained=False, num_classes=n, **kw)


@dataclass(frozen=True)
class Family:
    """One model family: how to build it, what it eats, where its head must be found."""

    id: str
    build: Callable[[int], nn.Module]  # num_classes -> a model with random weights
    inputs: Callable[[int, torch.Generator], Any]
    path: str
    kind: str = "linear"
    paths: tuple[str, ...] = field(default=())
    bias: bool = True
    framework: str = "torchvision"
    not_heads: tuple[str, ...] = ()  # modules near the head that must not be taken for it

    @property
    def all_paths(self) -> tuple[str, ...]:
        return self.paths or (self.path,)


FAMILIES = [
    Family("tv-resnet18", lambda n: tvm.resnet18(num_classes=n), _images(32), "fc"),
    Family(
        "tv-vgg11",
        lambda n: tvm.vgg11(num_classes=n),
        _images(32),
        "classifier.6",
        not_heads=("classifier.3",),
    ),
    Family(
        "tv-mobilenet_v3_small",
        lambda n: tvm.mobilenet_v3_small(num_classes=n),
        _images(32),
        "classifier.3",
        not_heads=("classifier.0",),
    ),
    Family(
        "tv-efficientnet_b0",
        lambda n: tvm.efficientnet_b0(num_classes=n),
        _images(32),
        "classifier.1",
    ),
    Family(
        "tv-convnext_tiny", lambda n: tvm.convnext_tiny(num_classes=n), _images(32), "classifier.2"
    ),
    Family("tv-densenet121", lambda n: tvm.densenet121(num_classes=n), _images(32), "classifier"),
    # the 1x1 conv head sits before a ReLU and a global pool; 32x32 is too small for its stem
    Family(
        "tv-squeezenet1_0",
        lambda n: tvm.squeezenet1_0(num_classes=n),
        _images(64),
        "classifier.1",
        kind="conv1x1",
    ),
    Family(
        "tv-vit_b_16",
        lambda n: tvm.vit_b_16(num_classes=n, image_size=32),
        _images(32),
        "heads.head",
    ),
    Family("tv-swin_t", lambda n: tvm.swin_t(num_classes=n), _images(32), "head"),
    # maxvit_t's partition size 7 needs every stage's map divisible by 7: 224 is the smallest
    Family(
        "tv-maxvit_t",
        lambda n: tvm.maxvit_t(num_classes=n),
        _images(224),
        "classifier.5",
        bias=False,
        not_heads=("classifier.3",),
    ),
    # auxiliary heads exist with aux_logits=True and grow with the main one (they do not run
    # in eval mode, so imprinting starts them from the mean of their old rows)
    Family(
        "tv-googlenet_aux",
        lambda n: tvm.googlenet(num_classes=n, aux_logits=True, init_weights=True),
        _images(64),
        "fc",
        paths=("fc", "aux1.fc2", "aux2.fc2"),
    ),
    Family("timm-resnet18", _timm("resnet18"), _images(32), "fc", framework="timm"),
    Family(
        "timm-deit_tiny_distilled",
        _timm("deit_tiny_distilled_patch16_224", img_size=32),
        _images(32),
        "head",
        paths=("head", "head_dist"),
        framework="timm",
    ),
    Family("timm-dla34", _timm("dla34"), _images(32), "fc", kind="conv1x1", framework="timm"),
    Family("hf-bert", _bert, _tokens(99), "classifier", framework="transformers"),
    Family(
        "hf-roberta",
        _roberta,
        _tokens(99),
        "classifier.out_proj",
        framework="transformers",
        not_heads=("classifier.dense",),
    ),
    Family("hf-llama", _llama, _tokens(99), "score", bias=False, framework="transformers"),
    Family(
        "hf-distilbert",
        _distilbert,
        _tokens(99),
        "classifier",
        framework="transformers",
        not_heads=("pre_classifier",),
    ),
]
BY_ID = {f.id: f for f in FAMILIES}
IDS = [f.id for f in FAMILIES]


@dataclass
class Built:
    """A family's model built once, with fixed inputs, its logits on them, and examples."""

    family: Family
    model: nn.Module
    x: Any  # a batch of 2 inputs
    logits: torch.Tensor  # the model's logits on x, before any grafting
    examples: Any  # SHOTS examples of each new class (labels as names)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # path -> (weight, bias) clones

    def fresh(self) -> nn.Module:
        """A deep copy whose body shares the built model's tensors (grafting replaces only
        head modules, so only those need their own copies; vgg11's body alone is 500 MB)."""
        heads = self.family.all_paths
        memo = {
            id(t): t
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]
            if not any(name.startswith(f"{p}.") for p in heads)
        }
        return copy.deepcopy(self.model, memo)

    @functools.cached_property
    def stats(self) -> hg.ClassStats:
        """Statistics of the head's inputs over the examples (the new classes)."""
        return hg.ClassStats.collect(self.model, self.examples)

    def out(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return logits_of(forward(model, self.x))


_CACHE: dict[str, Built] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread while this module runs, restored afterwards: these convolutions
    are small, and on a shared two-core machine spinning worker threads cost several times
    the work itself (measured: the owned suite took 35 s of CPU with one thread, 190 s with
    two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _examples(fam: Family, g: torch.Generator) -> Any:
    x = fam.inputs(SHOTS * len(NEW), g)
    names = [c for c in NEW for _ in range(SHOTS)]
    if isinstance(x, dict):  # Hugging Face style: a list of dict batches carrying "labels"
        return [{**x, "labels": names}]
    return (x, names)


@pytest.fixture(scope="module")
def build() -> Callable[[str], Built]:
    """Factory: the built model of a family (cached for the module; tests deepcopy it)."""

    def get(fid: str) -> Built:
        if fid not in _CACHE:
            fam = BY_ID[fid]
            torch.manual_seed(0)
            model = fam.build(NUM_CLASSES).eval()
            g = torch.Generator().manual_seed(1)
            x = fam.inputs(2, g)
            with torch.no_grad():
                logits = logits_of(forward(model, x))
            rows = {}
            for p in fam.all_paths:
                w, b = full_rows(get_module(model, p))
                rows[p] = (w.clone(), None if b is None else b.clone())
            _CACHE[fid] = Built(fam, model, x, logits, _examples(fam, g), rows)
        return _CACHE[fid]

    yield get
    _CACHE.clear()


def _init_kwargs(init: str, b: Built, old_names: list[str]) -> dict[str, Any]:
    if init == "imprint":
        return {"examples": b.examples}
    if init == "stats":
        return {"stats": b.stats}
    if init == "copy":
        return {"init_options": {"source": old_names[2]}}
    return {}


def _assert_old_rows_kept(b: Built, model: nn.Module, total: int) -> None:
    for p in b.family.all_paths:
        w, bias = full_rows(get_module(model, p))
        ow, ob = b.rows[p]
        assert w.shape[0] == total
        assert torch.equal(w[:NUM_CLASSES], ow), f"old rows of {p} changed"
        if ob is None:
            assert bias is None
        else:
            assert torch.equal(bias[:NUM_CLASSES], ob), f"old biases of {p} changed"
        assert torch.isfinite(w).all()


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fid", IDS)
def test_head_found(build: Callable[[str], Built], fid: str) -> None:
    b = build(fid)
    fam = b.family
    h = hg.find_head(b.model)
    assert (h.path, h.kind, h.paths) == (fam.path, fam.kind, fam.all_paths)
    assert h.num_classes == NUM_CLASSES
    head = get_module(b.model, fam.path)
    assert h.module is head
    assert h.in_features == head.weight.shape[1]
    assert (getattr(head, "bias", None) is not None) == fam.bias
    assert h.locator == fam.framework
    for p in fam.not_heads:
        assert p not in h.paths
    # naming the path explicitly finds the same head
    assert hg.find_head(b.model, ",".join(fam.all_paths)).paths == fam.all_paths


@pytest.mark.parametrize("init", hg.INITS.names())
@pytest.mark.parametrize("fid", IDS)
def test_every_init_keeps_old_rows_and_logits(
    build: Callable[[str], Built], fid: str, init: str
) -> None:
    b = build(fid)
    model = b.fresh()
    old_names = hg.labels(model).names
    out = hg.add_classes(model, NEW, init=init, seed=0, **_init_kwargs(init, b, old_names))
    assert out is model
    _assert_old_rows_kept(b, model, NUM_CLASSES + len(NEW))
    for p in b.family.not_heads:
        assert torch.equal(get_module(model, p).weight, get_module(b.model, p).weight)
    logits = b.out(model)
    assert logits.shape == (2, NUM_CLASSES + len(NEW))
    # a wider fused layer may round differently; the old logits agree to float precision
    torch.testing.assert_close(logits[:, :NUM_CLASSES], b.logits)
    assert torch.isfinite(logits).all()
    assert hg.labels(model).names == old_names + NEW


@pytest.mark.parametrize("fid", IDS)
def test_split_layout_is_bit_identical_fuse_reloads_and_split_round_trips(
    build: Callable[[str], Built], fid: str
) -> None:
    b = build(fid)
    model = b.fresh()
    hg.add_classes(model, NEW, init="random", seed=0, layout="split")
    for p in b.family.all_paths:
        assert isinstance(get_module(model, p), hg.SplitHead)
    _assert_old_rows_kept(b, model, NUM_CLASSES + len(NEW))
    split_logits = b.out(model)
    assert torch.equal(split_logits[:, :NUM_CLASSES], b.logits)
    rows = {p: full_rows(get_module(model, p)) for p in b.family.all_paths}

    hg.fuse(model)
    for p in b.family.all_paths:
        head = get_module(model, p)
        assert not isinstance(head, hg.SplitHead)
        w, bias = full_rows(head)
        assert torch.equal(w, rows[p][0])
        assert (bias is None) == (rows[p][1] is None)
        if bias is not None:
            assert torch.equal(bias, rows[p][1])
    fused_logits = b.out(model)
    torch.testing.assert_close(fused_logits, split_logits)
    # the fused head is what the framework builds for n + k classes: the state dict loads
    # strictly into a fresh model of that size, which gives the same logits
    bigger = b.family.build(NUM_CLASSES + len(NEW)).eval()
    bigger.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(b.out(bigger), fused_logits)

    hg.split(model, NUM_CLASSES)
    for p in b.family.all_paths:
        w, _ = full_rows(get_module(model, p))
        assert torch.equal(w, rows[p][0])
    # the old block is again a NUM_CLASSES-row layer with the same rows: same arithmetic
    assert torch.equal(b.out(model), split_logits)


@pytest.mark.parametrize("layout", ["fused", "split"])
@pytest.mark.parametrize("fid", IDS)
def test_remove_after_add_restores_the_head(
    build: Callable[[str], Built], fid: str, layout: str
) -> None:
    b = build(fid)
    model = b.fresh()
    labels_before = hg.labels(model).names
    originals = {p: get_module(model, p) for p in b.family.all_paths}
    hg.add_classes(model, NEW, init="random", seed=0, layout=layout)
    hg.remove_classes(model, NEW)
    for p in b.family.all_paths:
        head = get_module(model, p)
        if layout == "split":
            assert head is originals[p]  # the original layer object comes back
        assert type(head) is type(originals[p])
        w, bias = full_rows(head)
        assert torch.equal(w, b.rows[p][0])
        assert (bias is None) == (b.rows[p][1] is None)
        if bias is not None:
            assert torch.equal(bias, b.rows[p][1])
    assert torch.equal(b.out(model), b.logits)
    assert hg.find_head(model).num_classes == NUM_CLASSES
    assert hg.labels(model).names == labels_before
    if b.family.framework == "transformers":
        assert model.config.num_labels == model.num_labels == NUM_CLASSES
        assert model.config.id2label == dict(enumerate(labels_before))
    if b.family.framework == "timm":
        assert model.num_classes == NUM_CLASSES


@pytest.mark.parametrize("fid", IDS)
def test_labels_in_step(build: Callable[[str], Built], fid: str) -> None:
    b = build(fid)
    model = b.fresh()
    before = hg.labels(model).names
    assert len(before) == NUM_CLASSES
    hg.add_classes(model, NEW, init="zeros", bias="zero")
    after = hg.labels(model).names
    assert after == before + NEW
    assert hg.find_head(model).num_classes == len(after)
    fw = b.family.framework
    if fw == "transformers":
        cfg = model.config
        assert cfg.num_labels == model.num_labels == len(after)
        assert cfg.id2label == dict(enumerate(after))
        assert cfg.label2id == {n: i for i, n in enumerate(after)}
        # the model's own loss sees the new classes
        batch = dict(b.x, labels=torch.tensor([NUM_CLASSES, NUM_CLASSES + 2]))
        loss = model(**batch).loss
        assert torch.isfinite(loss)
    elif fw == "timm":
        assert model.num_classes == len(after)
        assert model.pretrained_cfg["num_classes"] == len(after)
    # the grown head answers with one logit per label
    assert b.out(model).shape[-1] == len(after)


BIAS_FAMILIES = ["tv-resnet18", "tv-squeezenet1_0", "timm-deit_tiny_distilled", "hf-roberta"]


@pytest.mark.parametrize("bias", hg.BIASES.names())
@pytest.mark.parametrize("fid", BIAS_FAMILIES)
def test_bias_policies(build: Callable[[str], Built], fid: str, bias: str) -> None:
    b = build(fid)
    model = b.fresh()
    stats = b.stats
    hg.add_classes(model, NEW, init="imprint", bias=bias, examples=b.examples, stats=stats)
    _assert_old_rows_kept(b, model, NUM_CLASSES + len(NEW))
    _, new_bias = full_rows(get_module(model, b.family.path))
    assert torch.isfinite(new_bias).all()
    logits = b.out(model)
    torch.testing.assert_close(logits[:, :NUM_CLASSES], b.logits)
    if bias == "zero":
        assert torch.equal(new_bias[NUM_CLASSES:], torch.zeros(len(NEW)))
    if bias == "silent":
        # new classes win on none of the known examples: predictions do not change on deploy
        inputs = b.examples[0]
        if isinstance(inputs, dict):
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            assert (logits_of(forward(model, inputs)).argmax(-1) < NUM_CLASSES).all()


@pytest.mark.parametrize("fid", ["hf-llama", "tv-maxvit_t"])
def test_bias_policy_on_a_head_without_bias_is_refused(
    build: Callable[[str], Built], fid: str
) -> None:
    b = build(fid)
    model = b.fresh()
    with pytest.raises(hg.UnsupportedHeadError, match="no bias"):
        hg.add_classes(model, NEW, init="zeros", bias="silent", stats=b.stats)
    assert hg.find_head(model).num_classes == NUM_CLASSES  # nothing changed


def test_distilbert_pre_classifier_is_not_the_classifier(build: Callable[[str], Built]) -> None:
    b = build("hf-distilbert")
    model = b.fresh()
    pre = model.pre_classifier.weight.clone()
    assert hg.find_head(model, "classifier").path == "classifier"
    hg.add_classes(model, NEW, init="mean")
    assert model.pre_classifier.out_features == pre.shape[0]
    assert torch.equal(model.pre_classifier.weight, pre)
    assert model.classifier.out_features == NUM_CLASSES + len(NEW)


@pytest.mark.parametrize("fid", ["hf-bert", "hf-llama"])
def test_hf_grown_model_reloads_with_from_pretrained(
    build: Callable[[str], Built], fid: str, tmp_path
) -> None:
    b = build(fid)
    model = b.fresh()
    hg.add_classes(model, NEW, init="imprint", examples=b.examples, layout="split")
    hg.fuse(model)
    expected = b.out(model)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert again.config.num_labels == NUM_CLASSES + len(NEW)
    assert hg.labels(again).names == hg.labels(model).names
    assert torch.equal(b.out(again), expected)


@pytest.mark.parametrize(("init", "bias"), [("imprint", "silent"), ("copy", "balanced")])
def test_auxiliary_heads_without_features_start_from_the_mean(
    build: Callable[[str], Built], init: str, bias: str
) -> None:
    """GoogLeNet's aux heads do not run in eval mode, so examples give them no features:
    they start from the mean of their old rows instead of failing for lack of examples."""
    b = build("tv-googlenet_aux")
    model = b.fresh()
    hg.add_classes(model, NEW, init=init, bias=bias, examples=b.examples, seed=0)
    _assert_old_rows_kept(b, model, NUM_CLASSES + len(NEW))
    for p in ("aux1.fc2", "aux2.fc2"):
        w, _ = full_rows(get_module(model, p))
        old = b.rows[p][0]
        spread = (old - old.mean(0)).norm(dim=1).mean()
        assert ((w[NUM_CLASSES:] - old.mean(0)).norm(dim=1) < 0.2 * spread).all()
    model.train()
    outs = model(b.examples[0])  # training mode: the aux heads run and answer for all labels
    assert [o.shape[-1] for o in outs] == [NUM_CLASSES + len(NEW)] * 3
