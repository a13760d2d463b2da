"""The issue's digits scenario, built once: an MLP 64-128-128-7 trained on digits 0-6 (the
demo's recipe, 60 epochs), the new digits 7-9, and the old classes' statistics."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from headgraft.data import Split, digits
from headgraft.demo import train_base
from headgraft.stats import ClassStats

OLD = [str(c) for c in range(7)]
NEW = ["7", "8", "9"]


@dataclass
class Scenario:
    split: Split
    base: nn.Module
    x_old: torch.Tensor
    y_old: torch.Tensor
    x_new: torch.Tensor
    y_new: list[str]
    stats: ClassStats

    def model(self) -> nn.Module:
        """A fresh copy of the base model (tests change their copy in place)."""
        return copy.deepcopy(self.base)

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.x_test, self.split.y_test


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription
    (15x slower otherwise); restored after each module so other tests are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def scenario() -> Scenario:
    split = digits()
    base = train_base(split, list(range(7)), seed=0)
    base.headgraft_labels = list(OLD)
    x_old, y_old = split.select(list(range(7)))
    x_new, y_new = split.select([7, 8, 9])
    stats = ClassStats.collect(base, (x_old, y_old), labels=OLD)
    return Scenario(split, base, x_old, y_old, x_new, [str(int(c)) for c in y_new], stats)
