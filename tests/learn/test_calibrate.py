"""Post-hoc corrections: new rows only, fitted on held-out data, auto picks by accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from headgraft.errors import InputError
from headgraft.learn import CALIBRATIONS, calibrate
from headgraft.learn.calibrate import balanced_accuracy


def _biased_problem(bias: float = 10.0, n: int = 60):
    """4 old + 2 new Gaussian classes; the ideal head plus a large offset on the new logits."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g)
    y = torch.arange(6).repeat_interleave(n)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    head = nn.Linear(16, 6)
    with torch.no_grad():
        head.weight.copy_(centres)
        head.bias.copy_(-0.5 * (centres**2).sum(1))
        head.weight[4:] *= 1.6  # new rows too large, as after training on new data alone
        head.bias[4:] += bias
    return head, x, y


def test_bias_correction_fixes_a_biased_head_and_keeps_old_rows() -> None:
    head, x, y = _biased_problem()
    w_old, b_old = head.weight[:4].clone(), head.bias[:4].clone()
    before = balanced_accuracy(head(x).detach(), y)
    c = calibrate(head, 4, x, y, "bias")
    after = balanced_accuracy(head(x).detach(), y)
    assert after > before + 0.1 and after > 0.95  # the ideal head scores 0.98
    assert torch.equal(head.weight[:4], w_old) and torch.equal(head.bias[:4], b_old)
    assert c.name == "bias" and c.shift < 0  # the new logits were pushed down


def test_weight_align_matches_norms() -> None:
    head, x, y = _biased_problem()
    calibrate(head, 4, x, y, "weight-align")
    norms = head.weight.detach().norm(dim=1)
    assert float(norms[4:].mean()) == pytest.approx(float(norms[:4].mean()), rel=1e-5)


def test_auto_chooses_a_correction_only_when_it_clearly_helps() -> None:
    head, x, y = _biased_problem()
    c = calibrate(head, 4, x, y, "auto")
    assert c.name != "none" and c.details["auto_scores"][c.name] > c.details["auto_scores"]["none"]
    fair, x2, y2 = _biased_problem(bias=0.0)
    with torch.no_grad():
        fair.weight[4:] /= 1.6  # the ideal head: nothing to correct
    w = fair.weight.clone()
    assert calibrate(fair, 4, x2, y2, "auto").name == "none"
    assert torch.equal(fair.weight, w)


def test_fitted_corrections_need_old_and_new_examples() -> None:
    head, x, y = _biased_problem()
    new_only = y >= 4
    with pytest.raises(InputError, match="held-out"):
        calibrate(head, 4, x[new_only], y[new_only], "bias")
    assert calibrate(head, 4, x[new_only], y[new_only], "auto").name == "none"
    with pytest.raises(InputError, match="unknown calibration"):
        calibrate(head, 4, x, y, "platt")
    assert set(CALIBRATIONS.names()) >= {"none", "weight-align", "bias", "temperature", "auto"}
