"""Head layers the package provides: a cosine classifier and the split (old | new) head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """Cosine-similarity classifier: ``scale * normalize(x) @ normalize(W).T (+ bias)``.

    Row norms do not matter, only directions, so new rows cannot dominate old ones by size;
    the learnable ``scale`` sets the logit range (as in LUCIR and imprinted-weights heads).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        scale: float = 16.0,
        learn_scale: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.scale = nn.Parameter(torch.tensor(float(scale), **kw), requires_grad=learn_scale)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1)) * self.scale
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class SplitHead(nn.Module):
    """The grown head as two blocks: the untouched original layer and a layer of new rows.

    The old logits are computed by the original module itself, so they are bit-identical to
    the model before grafting by construction; the output is ``cat([old(x), new(x)], dim)``.
    ``headgraft.fuse`` turns it into one ordinary layer (what checkpoints expect), and
    ``headgraft.split`` turns a fused layer back into this form, both losslessly.
    """

    def __init__(self, old: nn.Module, new: nn.Module, dim: int = -1) -> None:
        super().__init__()
        self.old = old
        self.new = new
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.old(x), self.new(x)], dim=self.dim)

    @property
    def num_old(self) -> int:
        return self.old.weight.shape[0]

    @property
    def num_new(self) -> int:
        return self.new.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.old.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.num_old + self.num_new

    @property
    def weight(self) -> torch.Tensor:
        """The fused weight (a new tensor, for reading; train ``old``/``new`` directly)."""
        return torch.cat([self.old.weight, self.new.weight]).detach()

    @property
    def bias(self) -> torch.Tensor | None:
        ob, nb = getattr(self.old, "bias", None), getattr(self.new, "bias", None)
        return None if ob is None or nb is None else torch.cat([ob, nb]).detach()

    def extra_repr(self) -> str:
        return f"num_old={self.num_old}, num_new={self.num_new}, dim={self.dim}"
