"""DistillationLoss and FeatureDistillationLoss: the LwF formula, its defaults and checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headgraft.errors import InputError
from headgraft.learn import DistillationLoss, FeatureDistillationLoss
from headgraft.learn.losses import cross_entropy_with_distillation


def _manual(student: torch.Tensor, teacher: torch.Tensor, t: float, n: int) -> torch.Tensor:
    p = F.softmax(teacher / t, dim=1)
    return (p * (p.log() - F.log_softmax(student[:, :n] / t, dim=1))).sum(1).mean() * t * t


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_matches_the_kl_formula_with_t_squared(t: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 7, generator=g)
    got = DistillationLoss(temperature=t, alpha=alpha)(student, teacher)
    assert torch.allclose(got, alpha * _manual(student, teacher, t, 7), atol=1e-6)
    # the same with F.kl_div, the reference implementation
    ref = (
        F.kl_div(
            F.log_softmax(student[:, :7] / t, 1),
            F.log_softmax(teacher / t, 1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
        * alpha
    )
    assert torch.allclose(got, ref, atol=1e-6)


def test_num_old_from_teacher_constructor_or_call() -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    full = DistillationLoss()(student, teacher)  # teacher's width: all 10
    five = DistillationLoss(5)(student, teacher)
    assert torch.allclose(five, _manual(student, teacher[:, :5], 2.0, 5), atol=1e-6)
    assert torch.allclose(DistillationLoss()(student, teacher, 5), five)
    assert not torch.allclose(full, five)


def test_zero_when_student_matches_and_gradient_only_on_old_logits() -> None:
    teacher = torch.randn(6, 4)
    student = torch.cat([teacher, torch.randn(6, 3)], 1).requires_grad_(True)
    loss = DistillationLoss()(student, teacher)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    student2 = torch.randn(6, 7, requires_grad=True)
    DistillationLoss()(student2, teacher).backward()
    assert student2.grad[:, 4:].abs().sum() == 0 and student2.grad[:, :4].abs().sum() > 0


def test_per_example_reduction_and_bad_settings() -> None:
    s, t = torch.randn(5, 6), torch.randn(5, 3)
    per = DistillationLoss(reduction="none")(s, t)
    assert per.shape == (5,) and torch.allclose(per.mean(), DistillationLoss()(s, t))
    for kwargs in ({"temperature": 0.0}, {"alpha": -1.0}, {"reduction": "sum"}):
        with pytest.raises(InputError):
            DistillationLoss(**kwargs)
    with pytest.raises(InputError, match="num_old"):
        DistillationLoss(9)(s, t)


def test_feature_distillation() -> None:
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(FeatureDistillationLoss(2.0)(a, b), 2 * F.mse_loss(a, b))
    assert float(FeatureDistillationLoss(kind="cosine")(a, 3 * a)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(InputError):
        FeatureDistillationLoss(kind="l1")


@pytest.mark.parametrize("shape", [(8, 10, 7), (64, 300, 297)])
def test_soft_targets_and_fused_step_match_the_plain_losses(shape) -> None:
    b, c, n = shape
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(b, c, generator=g) * 3).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g)
    teacher = torch.randn(b, n, generator=g) * 3
    loss = DistillationLoss(temperature=2.0, alpha=0.7)
    soft = loss.soft_targets(teacher)
    assert torch.allclose(loss(z, soft=soft), loss(z, teacher), atol=1e-5)
    ce, kl = cross_entropy_with_distillation(z, y, soft, 0.7)
    (0.3 * ce + 1.7 * kl).backward()
    fused_grad, z.grad = z.grad.clone(), None
    ce2, kl2 = F.cross_entropy(z, y), loss(z, teacher)
    (0.3 * ce2 + 1.7 * kl2).backward()
    assert torch.allclose(ce, ce2, atol=1e-5) and torch.allclose(kl, kl2, atol=1e-5)
    assert torch.allclose(fused_grad, z.grad, atol=1e-6)
    with pytest.raises(InputError, match="temperature"):
        DistillationLoss(temperature=3.0)(z, soft=soft)
