"""Shared fixtures: the digits data and the MLP trained on digits 0-6 (built once per session)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from headgraft.data import Split, digits
from headgraft.demo import train_base

OLD_DIGITS = list(range(7))
NEW_DIGITS = [7, 8, 9]


@pytest.fixture(scope="session", autouse=True)
def _private_feature_cache(tmp_path_factory):
    """Keep the CLI's on-disk feature cache inside the test run (subprocesses inherit it),
    so tests never read or write the user's ~/.cache."""
    import os

    old = os.environ.get("HEADGRAFT_CACHE")
    os.environ["HEADGRAFT_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if old is None:
        os.environ.pop("HEADGRAFT_CACHE", None)
    else:
        os.environ["HEADGRAFT_CACHE"] = old


@pytest.fixture(scope="session")
def digits_split() -> Split:
    """scikit-learn digits, the package's fixed 70/30 stratified split."""
    return digits()


@pytest.fixture(scope="session")
def digits_base(digits_split: Split) -> nn.Module:
    """The MLP 64-128-128-7 trained on digits 0-6 (Adam, cross-entropy), labels "0".."6".

    Session-scoped and read-only: tests that change it work on a ``copy.deepcopy``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 64 x 128: extra threads only add spinning
    try:
        model = train_base(digits_split, OLD_DIGITS, epochs=40, seed=0)
    finally:
        torch.set_num_threads(threads)
    model.headgraft_labels = [str(c) for c in OLD_DIGITS]
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.fixture(scope="session")
def digits_shots(digits_split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 10 training examples of each new digit (7, 8, 9), labels as digit indices."""
    idx = torch.cat([torch.nonzero(digits_split.y_train == c).flatten()[:10] for c in NEW_DIGITS])
    return digits_split.x_train[idx], digits_split.y_train[idx]
