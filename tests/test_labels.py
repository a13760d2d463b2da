"""LabelMap (append-only names <-> indices) and the labels a model carries."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from torch import nn

import headgraft as hg
from headgraft.labels import LABELS_ATTR, LabelMap, model_labels, set_model_labels


def test_names_and_indices() -> None:
    m = LabelMap(["cat", "dog", 3])
    assert m.names == ["cat", "dog", "3"] and len(m) == 3
    assert m.index("dog") == 1 and m.index(3) == 2 and m[0] == "cat"
    assert m.id2label == {0: "cat", 1: "dog", 2: "3"}
    assert m.label2id == {"cat": 0, "dog": 1, "3": 2}
    assert "cat" in m and "cow" not in m
    assert m == ["cat", "dog", "3"] and m == LabelMap(["cat", "dog", "3"])
    assert hash(m) == hash(LabelMap(["cat", "dog", "3"]))
    assert m.to_dict() == {"labels": ["cat", "dog", "3"]}


def test_extend_is_append_only_and_leaves_the_original() -> None:
    m = LabelMap(["a", "b"])
    g = m.extend(["c", "d"])
    assert g.names == ["a", "b", "c", "d"]
    assert all(g.index(n) == m.index(n) for n in m)  # old classes keep their index
    assert m.names == ["a", "b"]  # immutable


def test_remove_returns_the_kept_indices() -> None:
    m = LabelMap(["a", "b", "c", "d", "e"])
    smaller, keep = m.remove(["b", "d"])
    assert smaller.names == ["a", "c", "e"]
    assert keep == [0, 2, 4]
    assert [m[i] for i in keep] == smaller.names


def test_default_and_from_id2label() -> None:
    assert LabelMap.default(3).names == ["0", "1", "2"]
    assert LabelMap.from_id2label({"1": "dog", "0": "cat"}).names == ["cat", "dog"]
    with pytest.raises(hg.LabelError, match="not 0..n-1; fix the model config"):
        LabelMap.from_id2label({0: "a", 2: "b"})


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: LabelMap(["a", "a"]), "'a' more than once; give each class a distinct name"),
        (lambda: LabelMap([]), "empty; pass at least one label name"),
        (lambda: LabelMap(["a", " "]), "empty name; give every class a non-empty name"),
        (lambda: LabelMap(["a"]).extend("bc"), r"not the string 'bc'; pass \['bc'\]"),
        (lambda: LabelMap(["a"]).extend(["b", "b"]), "more than once"),
        (lambda: LabelMap(["a"]).extend([]), "new labels is empty"),
        (lambda: LabelMap(["a", "b"]).extend(["c", "a"]), "'a' already exist.*choose new"),
        (lambda: LabelMap(["a", "b"]).remove(["z"]), "unknown label 'z'; the model's labels"),
        (lambda: LabelMap(["a", "b"]).remove([]), "labels to remove is empty"),
        (lambda: LabelMap(["a", "b"]).remove(["a", "b"]), "cannot remove every class"),
        (lambda: LabelMap(["a"]).index("q"), "unknown label 'q'; the model's labels are: a"),
    ],
    ids=[
        "dup",
        "empty",
        "blank",
        "string",
        "dup-new",
        "empty-new",
        "existing",
        "unknown",
        "remove-empty",
        "remove-all",
        "index",
    ],
)
def test_label_errors_name_the_fix(call, pattern: str) -> None:
    with pytest.raises(hg.LabelError, match=pattern) as info:
        call()
    assert isinstance(info.value, hg.InputError) and isinstance(info.value, KeyError)
    assert not str(info.value).startswith("'")  # not quoted like a bare KeyError


def test_unknown_label_message_is_bounded_for_many_classes() -> None:
    m = LabelMap.default(1000)
    with pytest.raises(hg.LabelError) as info:
        m.index("x")
    assert str(info.value).endswith("...") and len(str(info.value)) < 200


# ----------------------------------------------------------------------------- on models


def test_plain_model_defaults_then_stored_names() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    assert model_labels(model).names == ["0", "1", "2"]
    set_model_labels(model, LabelMap(["x", "y", "z"]))
    assert hg.labels(model).names == ["x", "y", "z"]
    hg.add_classes(model, ["w"], seed=0)
    assert getattr(model, LABELS_ATTR) == ["x", "y", "z", "w"]
    assert hg.labels(model).names == ["x", "y", "z", "w"]


def test_stale_stored_names_are_ignored() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    setattr(model, LABELS_ATTR, ["a", "b"])  # wrong length: not this head's names
    assert model_labels(model).names == ["0", "1", "2"]


def test_hugging_face_config_labels_grow_and_shrink_in_step() -> None:
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    model = transformers.BertForSequenceClassification(cfg)
    assert hg.labels(model).names == ["neg", "pos"]
    hg.add_classes(model, ["neutral"], seed=0)
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    assert model.config.label2id == {"neg": 0, "pos": 1, "neutral": 2}
    assert model.config.num_labels == model.num_labels == 3
    hg.remove_classes(model, ["neg"])
    assert model.config.id2label == {0: "pos", 1: "neutral"}
    assert model.config.num_labels == model.num_labels == 2
    assert model.classifier.out_features == 2


def test_timm_label_names_and_num_classes() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    model.pretrained_cfg["label_names"] = ["a", "b", "c"]
    assert hg.labels(model).names == ["a", "b", "c"]
    hg.add_classes(model, ["d"], seed=0)
    assert model.num_classes == 4 and model.pretrained_cfg["num_classes"] == 4
    assert model.pretrained_cfg["label_names"] == ["a", "b", "c", "d"]
    assert model.get_classifier().out_features == 4


def test_a_num_classes_property_is_not_overwritten() -> None:
    class WithProperty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        @property
        def num_classes(self) -> int:
            return self.fc.out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = WithProperty()
    hg.add_classes(model, ["n"], seed=0)
    assert model.num_classes == 4


def test_an_edited_hugging_face_config_wins_over_stored_names() -> None:
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(cfg)
    hg.add_classes(model, ["c"], seed=0)
    model.config.id2label = {0: "neg", 1: "pos", 2: "neutral"}  # the user renames classes
    assert hg.labels(model).names == ["neg", "pos", "neutral"]
