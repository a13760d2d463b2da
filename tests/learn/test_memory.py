"""ExemplarMemory (herding / random, files, taking exemplars) and class-balanced batches."""

from __future__ import annotations

import json

import pytest
import torch

from headgraft.errors import InputError
from headgraft.learn import SELECTIONS, BalancedBatches, ExemplarMemory


@pytest.mark.parametrize("selection", SELECTIONS.names())
def test_k_per_class_deterministic_and_from_the_right_class(scenario, selection) -> None:
    mem = ExemplarMemory(per_class=20, selection=selection, seed=3)
    mem.build(scenario.base, (scenario.x_old, scenario.y_old))
    assert len(mem) == 140 and mem.counts() == {str(c): 20 for c in range(7)}
    assert len(set(mem.indices.tolist())) == 140
    for i, lab in zip(mem.indices.tolist(), mem.labels):
        assert str(int(scenario.y_old[i])) == lab  # each index is an example of its label
    again = ExemplarMemory(per_class=20, selection=selection, seed=3)
    again.build(scenario.base, (scenario.x_old, scenario.y_old))
    assert torch.equal(mem.indices, again.indices)


def test_herding_mean_is_closer_than_random(scenario) -> None:
    """Herding's point: the exemplars' mean feature approximates the class mean."""
    feats = scenario.base[:4](scenario.x_old).detach()
    feats = torch.nn.functional.normalize(feats, dim=1)
    names = [str(int(c)) for c in scenario.y_old]

    def gap(mem: ExemplarMemory) -> float:
        total = 0.0
        for c in range(7):
            idx = mem.indices[[lab == str(c) for lab in mem.labels]]
            total += float((feats[idx].mean(0) - feats[scenario.y_old == c].mean(0)).norm())
        return total

    herding = gap(ExemplarMemory(5, "herding").select(feats, names))
    rand = sum(gap(ExemplarMemory(5, "random", seed=s).select(feats, names)) for s in range(5))
    assert herding < 0.7 * rand / 5  # herding's exemplars at least 30% closer to the mean


def test_save_load_take_roundtrip(tmp_path, scenario) -> None:
    mem = ExemplarMemory(per_class=3, selection="random", seed=1)
    mem.build(scenario.base, (scenario.x_old, scenario.y_old))
    path = tmp_path / "memory.json"
    mem.save(path)
    loaded = ExemplarMemory.load(path)
    assert torch.equal(loaded.indices, mem.indices) and loaded.labels == mem.labels
    x, labels = loaded.take((scenario.x_old, scenario.y_old))
    assert torch.equal(x, scenario.x_old[mem.indices]) and labels == mem.labels
    assert json.loads(path.read_text())["format"].startswith("headgraft.ExemplarMemory")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(InputError, match="not a headgraft exemplar memory"):
        ExemplarMemory.load(bad)
    with pytest.raises(InputError, match="refers to example"):
        loaded.take((scenario.x_old[:5], scenario.y_old[:5]))


def test_errors() -> None:
    with pytest.raises(InputError):
        ExemplarMemory(per_class=0)
    with pytest.raises(InputError, match="unknown exemplar selection"):
        ExemplarMemory(selection="best")
    with pytest.raises(InputError, match="no examples of class"):
        ExemplarMemory(2).select(torch.randn(4, 3), ["a", "a", "b", "b"], classes=["a", "c"])


def test_balanced_batches_hold_new_and_memory_and_balance_classes() -> None:
    # 300 new examples of 3 classes (unbalanced), 70 exemplars of 7 old classes
    new_t = torch.cat([torch.full((200,), 7), torch.full((60,), 8), torch.full((40,), 9)])
    mem_t = torch.arange(7).repeat_interleave(10)
    mem = ExemplarMemory(10)
    batches = list(mem.batches(new_t, mem_t, 20, seed=0, epoch=0))
    assert len(batches) == -(-370 // 20)
    counts = torch.zeros(10)
    for b in batches:
        assert len(b) == 20
        assert (b < 300).any() and (b >= 300).any()  # new data and memory in every step
        t = torch.cat([new_t, mem_t])[b]
        counts += torch.bincount(t, minlength=10)
    # every class appears (nearly) equally often, whatever its size
    assert counts.max() - counts.min() <= 2
    again = list(mem.batches(new_t, mem_t, 20, seed=0, epoch=0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = list(mem.batches(new_t, mem_t, 20, seed=0, epoch=1))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_balanced_batches_small_batch_error() -> None:
    with pytest.raises(InputError, match="too small"):
        BalancedBatches(torch.tensor([0, 1, 2]), 1, parts=[torch.tensor([0]), torch.tensor([1, 2])])
