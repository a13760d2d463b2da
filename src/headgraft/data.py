"""Data sources. The built-in one is scikit-learn's handwritten digits (8x8 images)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import HeadgraftError


@dataclass
class Split:
    """Train and test tensors of one data set: float32 inputs, int64 class indices."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    labels: list[str]

    def select(self, classes: list[int], part: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (self.x_train, self.y_train) if part == "train" else (self.x_test, self.y_test)
        mask = torch.isin(y, torch.tensor(classes))
        return x[mask], y[mask]


def digits(test_size: float = 0.3, random_state: int = 0) -> Split:
    """scikit-learn's digits (1797 8x8 images, 10 classes), scaled to [0, 1], with a fixed
    stratified train/test split (70/30, ``random_state=0``)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError:
        raise HeadgraftError(
            "the built-in digits data needs scikit-learn; pip install 'headgraft[data]'"
        ) from None
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=random_state
    )
    f = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Split(f(xtr), g(ytr), f(xte), g(yte), [str(i) for i in range(10)])
