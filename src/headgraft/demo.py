"""The built-in demonstration: digits 0-6 learned first, 7-9 grafted on."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .data import Split, digits
from .graft import add_classes
from .inits import BIASES, INITS
from .stats import ClassStats

BASE = list(range(7))
NEW = [7, 8, 9]


def digits_mlp(num_classes: int, hidden: int = 128) -> nn.Sequential:
    """The demo's model: an MLP 64-128-128-n (the issue's reference scenario)."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def train_base(split: Split, classes: list[int], epochs: int = 60, seed: int = 0) -> nn.Module:
    """Train the MLP on ``classes`` with Adam and cross-entropy (full-batch shuffled epochs)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = digits_mlp(len(classes))
    x, y = split.select(classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


@dataclass
class Row:
    init: str
    bias: str
    old: float
    new: float
    all: float


@torch.no_grad()
def _accuracy(model: nn.Module, split: Split) -> tuple[float, float, float]:
    pred = model(split.x_test).argmax(1)
    hit = (pred == split.y_test).float()
    old = torch.isin(split.y_test, torch.tensor(BASE))
    return float(hit[old].mean()), float(hit[~old].mean()), float(hit.mean())


def graft_table(shots: int = 10, seed: int = 0, split: Split | None = None) -> list[Row]:
    """Graft 7-9 onto the base model with every initialiser and bias policy; no training."""
    split = split or digits()
    base = train_base(split, BASE, seed=seed)
    base.headgraft_labels = [str(c) for c in BASE]
    idx = torch.cat([torch.nonzero(split.y_train == c).flatten()[:shots] for c in NEW])
    examples = (split.x_train[idx], split.y_train[idx])
    stats = ClassStats.collect(base, (split.x_train, [str(int(c)) for c in split.y_train]),
                               labels=split.labels)
    rows = []
    for init in INITS:
        for bias in ("auto", *BIASES):
            model = copy.deepcopy(base)
            add_classes(model, [str(c) for c in NEW], init=init, bias=bias, examples=examples,
                        stats=stats, seed=seed, init_options={"source": "1"} if init == "copy"
                        else None)
            rows.append(Row(init, bias, *_accuracy(model, split)))
    return rows
