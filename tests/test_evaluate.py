"""evaluate(): every metric checked on predictions chosen by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import headgraft
from headgraft.errors import LabelError
from headgraft.evaluate import EvalReport, evaluate, expected_calibration_error


def _identity(labels: list[str]) -> nn.Linear:
    """A 'model' whose logits are its inputs, so the tests choose every prediction."""
    m = nn.Linear(len(labels), len(labels))
    with torch.no_grad():
        m.weight.copy_(torch.eye(len(labels)))
        m.bias.zero_()
    m.headgraft_labels = labels
    return m


def _logits(preds: list[int], n: int, conf: float = 5.0) -> torch.Tensor:
    x = torch.zeros(len(preds), n)
    x[torch.arange(len(preds)), torch.tensor(preds)] = conf
    return x


LABELS = ["a", "b", "c", "x", "y"]  # a, b, c old; x, y new


def test_old_new_all_harmonic_and_old_as_new() -> None:
    truth = ["a", "a", "b", "b", "c", "c", "x", "x", "y", "y"]
    preds = [0, 3, 1, 1, 4, 2, 3, 3, 4, 0]  # old: 4/6 right, 2 predicted new; new: 3/4
    r = evaluate(
        _identity(LABELS),
        (_logits(preds, 5), truth),
        old_labels=["a", "b", "c"],
        new_labels=["x", "y"],
    )
    assert r.old_accuracy == pytest.approx(4 / 6) and r.new_accuracy == pytest.approx(3 / 4)
    assert r.all_accuracy == pytest.approx(7 / 10)
    assert r.harmonic_mean == pytest.approx(2 * (4 / 6) * 0.75 / (4 / 6 + 0.75))
    assert r.old_as_new == pytest.approx(2 / 6)
    assert r.per_class == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.5, "x": 1.0, "y": 0.5})
    assert r.support == {"a": 2, "b": 2, "c": 2, "x": 2, "y": 2}
    assert r.confusion[0] == [1, 0, 0, 1, 0] and r.confusion[4] == [1, 0, 0, 0, 1]
    assert sum(map(sum, r.confusion)) == 10 and r.labels == LABELS
    json.dumps(r.to_dict())  # plain data


def test_integer_labels_index_old_then_new_and_split_heads_infer_groups() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    model[0].weight.data = torch.eye(3)
    model[0].bias.data.zero_()
    model.headgraft_labels = ["p", "q", "r"]
    headgraft.add_classes(model, ["s"], init="zeros", layout="split", seed=0)
    x = torch.cat([torch.eye(3) * 4, torch.zeros(1, 3)])
    r = evaluate(model, (x, torch.tensor([0, 1, 2, 3])))
    assert r.old_labels == ["p", "q", "r"] and r.new_labels == ["s"]
    assert r.old_accuracy == 1.0 and r.new_accuracy in (0.0, 1.0)


def test_forgetting_against_the_reference_model() -> None:
    old = ["a", "b", "c"]
    ref = _identity(old)
    grown = _identity(LABELS)
    truth = ["a", "a", "b", "b", "c", "c", "x"]
    x_ref = torch.cat([_logits([0, 0, 1, 1, 2, 1], 3), torch.zeros(1, 3)])
    ref_report = evaluate(ref, (x_ref, truth), old_labels=old, new_labels=["x", "y"])
    assert ref_report.per_class == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.5, "x": 0.0})
    # the grown model: a 1/2 (drop .5), b 2/2 (drop 0), c 0/2 (drop .5)
    x = _logits([0, 3, 1, 1, 3, 4, 3], 5)
    r = evaluate(grown, (x, truth), old_labels=old, new_labels=["x", "y"], reference=ref_report)
    assert r.forgetting == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert r.max_forgetting == pytest.approx(0.5)
    assert r.reference_old_accuracy == pytest.approx(5 / 6)

    # a reference *model* gives the same numbers (scored on the same data)
    class Shrink(nn.Module):  # the reference sees only its own three logits
        def __init__(self) -> None:
            super().__init__()
            self.fc = _identity(old)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.stack([z[:, 0], z[:, 1], z[:, 2]], 1))

    shrink = Shrink()
    shrink.headgraft_labels = old
    x_both = torch.zeros(7, 5)
    x_both[:, :3] = x_ref
    r2 = evaluate(
        _identity(LABELS), (x_both, truth), old_labels=old, new_labels=["x", "y"], reference=shrink
    )
    assert r2.reference_per_class == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.5})


def test_expected_calibration_error() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    correct = torch.tensor([True, True, True, False])
    # bins: 0.9 -> acc 1.0 (gap .1, 2 ex), 0.6 -> acc .5 (gap .1, 2 ex) -> ECE 0.1
    assert expected_calibration_error(probs, correct) == pytest.approx(0.1, abs=1e-6)
    r = evaluate(_identity(["a", "b"]), (torch.tensor([[5.0, 0.0]] * 4), ["a"] * 4))
    assert r.ece == pytest.approx(1 - torch.softmax(torch.tensor([5.0, 0.0]), 0)[0].item())


def test_bad_labels_and_callable_module() -> None:
    model = _identity(LABELS)
    with pytest.raises(LabelError, match="neither an old nor a new class"):
        evaluate(model, (torch.zeros(1, 5), ["zebra"]))
    with pytest.raises(LabelError, match="outside"):
        evaluate(model, (torch.zeros(1, 5), torch.tensor([9])))
    with pytest.raises(LabelError, match="both old and new"):
        evaluate(model, (torch.zeros(1, 5), ["a"]), old_labels=["a"], new_labels=["a"])
    r = headgraft.evaluate(model, (_logits([0], 5), ["a"]), old_labels=["a", "b", "c"])
    assert isinstance(r, EvalReport) and r.new_labels == ["x", "y"]
    assert r.new_accuracy != r.new_accuracy  # NaN: no new-class examples
    assert r.to_dict()["new_accuracy"] is None
