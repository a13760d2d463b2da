"""Optimizer state follows the grafted head: old rows keep their moments, new rows start at 0."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import headgraft as hg
from headgraft.errors import AmbiguousHeadError, InputError
from headgraft.io.optim import head_param_ids

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, amsgrad=True),
}


def _data(n_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 6, generator=g), torch.randint(0, n_classes, (64,), generator=g)


def _trained(name: str, steps: int = 5) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = OPTIMIZERS[name](model.parameters())
    x, y = _data(3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _head_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    return {
        k: {s: (v.clone() if torch.is_tensor(v) else v) for s, v in opt.state[p].items()}
        for k, p in (("w", model[2].weight), ("b", model[2].bias))
    }


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_live_optimizer_keeps_old_moments_and_zero_starts_new_rows(name: str) -> None:
    model, opt = _trained(name)
    before = _head_state(opt, model)
    hg.add_classes(model, ["x", "y"], seed=0)
    assert hg.grow_optimizer_state(opt, model) is opt
    after = _head_state(opt, model)
    for part in ("w", "b"):
        for key, old in before[part].items():
            new = after[part][key]
            if torch.is_tensor(old) and old.dim() >= 1:
                assert new.shape[0] == 5
                assert torch.equal(new[:3], old) and not new[3:].any(), (part, key)
            else:
                assert torch.equal(torch.as_tensor(new), torch.as_tensor(old)), key  # step
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == ids
    x, y = _data(5, seed=1)
    losses = []
    for _ in range(20):  # training resumes on the grown model, new classes included
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_resumed_adam_step_uses_the_carried_moments() -> None:
    model, opt = _trained("adam")
    m_old = opt.state[model[2].weight]["exp_avg"].clone()
    hg.add_classes(model, ["x"], seed=0)
    hg.grow_optimizer_state(opt, model)
    x, y = _data(4, seed=2)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = model[2].weight.grad.clone()
    opt.step()
    beta1 = opt.param_groups[0]["betas"][0]
    m = opt.state[model[2].weight]["exp_avg"]
    assert torch.allclose(m[:3], beta1 * m_old + (1 - beta1) * g[:3], atol=1e-7)
    assert torch.allclose(m[3:], (1 - beta1) * g[3:], atol=1e-7)


def test_split_layout_adds_the_new_block_to_the_heads_group() -> None:
    model, opt = _trained("adam")
    old_params = list(model[2].parameters())
    hg.add_classes(model, ["x"], layout="split", seed=0)
    hg.grow_optimizer_state(opt, model)
    group = opt.param_groups[0]["params"]
    assert all(any(p is q for q in group) for p in old_params)  # the old block is untouched
    assert any(p is model[2].new.weight for p in group)
    assert opt.state[model[2].old.weight]  # moments still there


def test_state_dict_with_the_model_and_after_removal() -> None:
    model, opt = _trained("adamw_amsgrad")
    sd = copy.deepcopy(opt.state_dict())
    hg.add_classes(model, ["x"], seed=0)
    grown = hg.grow_optimizer_state(sd, model)
    # parameters: 0 w1, 1 b1, 2 w2, 3 b2 -> the head is 2 and 3
    assert grown["state"][2]["exp_avg_sq"].shape == (4, 8)
    assert torch.equal(grown["state"][2]["max_exp_avg_sq"][:3], sd["state"][2]["max_exp_avg_sq"])
    assert grown["state"][0] is sd["state"][0]  # other parameters untouched
    assert sd["state"][2]["exp_avg"].shape == (3, 8)  # the input is not changed
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    fresh.load_state_dict(grown)
    hg.remove_classes(model, ["1"])
    shrunk = hg.grow_optimizer_state(grown, model, rows=[0, 2, 3])
    assert torch.equal(shrunk["state"][3]["exp_avg"], grown["state"][3]["exp_avg"][[0, 2, 3]])


def test_state_dict_errors_name_the_fix() -> None:
    model, opt = _trained("adam")
    sd = opt.state_dict()
    with pytest.raises(InputError, match="params="):
        hg.grow_optimizer_state(sd)
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(InputError, match="has 4 parameters but the model has 2"):
        hg.grow_optimizer_state(sd, other)
    hg.remove_classes(model, ["0"])
    with pytest.raises(InputError, match="rows="):
        hg.grow_optimizer_state(sd, model)
    with pytest.raises(InputError, match="grafted model"):
        hg.grow_optimizer_state(opt)


def test_head_params_by_shape_resolve_a_shared_bias_shape_by_order() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 3))
    opt = torch.optim.Adam(model.parameters())
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    sd = opt.state_dict()
    assert head_param_ids(sd, [(3, 3), (3,)]) == [2, 3]
    with pytest.raises(AmbiguousHeadError, match="--arch"):
        head_param_ids(sd, [(3,)])
