"""freeze_old_rows: old rows stay bit-identical through real optimisers, weight decay included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import headgraft
from headgraft.errors import InputError
from headgraft.learn import freeze_old_rows


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 40) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01),
    ],
    ids=["adamw", "sgd-momentum", "adam-l2"],
)
def test_old_rows_bit_identical_through_training(scenario, make_opt) -> None:
    model = scenario.model()
    headgraft.add_classes(model, ["7", "8", "9"], init="random", seed=0)
    w0, b0 = _bits(model[4].weight), _bits(model[4].bias)
    opt = make_opt(model.parameters())
    handle = freeze_old_rows(model, opt, num_old=7)
    _train(model, opt)
    assert torch.equal(_bits(model[4].weight)[:7], w0[:7])
    assert torch.equal(_bits(model[4].bias)[:7], b0[:7])
    assert not torch.equal(_bits(model[4].weight)[7:], w0[7:])  # new rows learned
    # removing the handle unfreezes: weight decay now moves the old rows
    handle.remove()
    _train(model, opt, steps=3)
    assert not torch.equal(_bits(model[4].weight)[:7], w0[:7])


def test_head_module_split_head_and_context_manager(scenario) -> None:
    model = scenario.model()
    headgraft.add_classes(model, ["7", "8", "9"], init="random", seed=0, layout="split")
    old = copy.deepcopy(model[4].old.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with freeze_old_rows(model[4], opt):
        _train(model, opt)
    for k, v in model[4].old.state_dict().items():
        assert torch.equal(v, old[k])


def test_cosine_head_keeps_its_shared_scale() -> None:
    head = headgraft.CosineLinear(8, 5)
    w0, s0 = head.weight.detach().clone(), head.scale.detach().clone()
    opt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=0.1)
    freeze_old_rows(head, opt, num_old=3)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(head(torch.randn(4, 8)), torch.tensor([0, 3, 4, 1])).backward()
        opt.step()
    assert torch.equal(head.weight[:3], w0[:3]) and torch.equal(head.scale, s0)
    assert not torch.equal(head.weight[3:], w0[3:])


def test_errors_name_the_fix(scenario) -> None:
    model = scenario.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InputError, match="num_old"):
        freeze_old_rows(model, opt)
    with pytest.raises(InputError, match="outside"):
        freeze_old_rows(model, opt, num_old=99)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(InputError, match="optimizer"):
        freeze_old_rows(model, other, num_old=3)
