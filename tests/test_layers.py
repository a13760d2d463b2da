"""The package's head layers: CosineLinear and SplitHead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headgraft as hg


def test_cosine_linear_is_scaled_cosine_similarity() -> None:
    torch.manual_seed(0)
    head = hg.CosineLinear(4, 3, scale=5.0)
    x = torch.randn(6, 4)
    want = 5.0 * nn.functional.cosine_similarity(x[:, None], head.weight[None], dim=-1)
    torch.testing.assert_close(head(x), want)
    assert head(x).abs().max() <= 5.0 + 1e-5


def test_cosine_linear_ignores_row_and_input_norms() -> None:
    torch.manual_seed(0)
    head = hg.CosineLinear(4, 3)
    x = torch.randn(2, 4)
    before = head(x)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([[10.0], [0.1], [3.0]]))
    torch.testing.assert_close(head(x), before)
    torch.testing.assert_close(head(7 * x), before)


def test_cosine_linear_scale_and_bias() -> None:
    learn = hg.CosineLinear(4, 2)
    assert learn.scale.requires_grad and learn.bias is None
    fixed = hg.CosineLinear(4, 2, learn_scale=False, bias=True, dtype=torch.float64)
    assert not fixed.scale.requires_grad
    assert fixed.bias is not None and fixed.weight.dtype == torch.float64
    with torch.no_grad():
        fixed.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.randn(3, 4, dtype=torch.float64)
    cos = nn.functional.cosine_similarity(x[:, None], fixed.weight[None], dim=-1)
    torch.testing.assert_close(fixed(x), fixed.scale * cos + torch.tensor([1.0, -1.0]).double())
    assert "bias=True" in repr(fixed)
    loss = learn(torch.randn(3, 4)).sum()
    loss.backward()
    assert learn.scale.grad is not None


def test_split_head_concatenates_blocks_and_exposes_fused_rows() -> None:
    torch.manual_seed(0)
    old, new = nn.Linear(4, 3), nn.Linear(4, 2)
    split = hg.SplitHead(old, new)
    x = torch.randn(5, 4)
    out = split(x)
    assert torch.equal(out[:, :3], old(x)) and torch.equal(out[:, 3:], new(x))
    assert (split.num_old, split.num_new, split.out_features, split.in_features) == (3, 2, 5, 4)
    assert torch.equal(split.weight, torch.cat([old.weight, new.weight]))
    assert torch.equal(split.bias, torch.cat([old.bias, new.bias]))
    assert set(split.state_dict()) == {"old.weight", "old.bias", "new.weight", "new.bias"}
    assert "num_old=3, num_new=2" in repr(split)


def test_split_head_without_bias_and_on_conv_maps() -> None:
    old, new = nn.Conv2d(4, 3, 1, bias=False), nn.Conv2d(4, 2, 1, bias=False)
    split = hg.SplitHead(old, new, dim=1)
    x = torch.randn(2, 4, 3, 3)
    out = split(x)
    assert out.shape == (2, 5, 3, 3)
    assert torch.equal(out[:, :3], old(x))
    assert split.bias is None


def test_split_head_trains_both_blocks_or_only_the_new_one() -> None:
    torch.manual_seed(0)
    split = hg.SplitHead(nn.Linear(4, 3), nn.Linear(4, 2))
    split.old.requires_grad_(False)  # freeze the old classes: their rows cannot move
    opt = torch.optim.SGD([p for p in split.parameters() if p.requires_grad], lr=0.5)
    before = split.old.weight.clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(split(torch.randn(8, 4)), torch.full((8,), 4)).backward()
        opt.step()
    assert torch.equal(split.old.weight, before)
    assert split.new.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_weight_view_is_detached(dtype: torch.dtype) -> None:
    split = hg.SplitHead(nn.Linear(4, 3).to(dtype), nn.Linear(4, 1).to(dtype))
    assert not split.weight.requires_grad and split.weight.dtype == dtype
