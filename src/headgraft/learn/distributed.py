"""Distributed helpers for ``torchrun``: process group set-up and reductions across ranks.

Class statistics are sums, so ranks add them (one all-reduce); exemplar selection and the
frozen-backbone feature cache need every example, so ranks gather them. Everything here is a
no-op in a single process, so the same code runs with and without ``torchrun``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import HeadgraftError
from ..stats import ClassStats


def env_world_size() -> int:
    """The world size ``torchrun`` announced in the environment (1 without it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, or from ``torchrun``'s environment once
    the group is gone (so only rank 0 writes outputs after training)."""
    if is_distributed():
        return dist.get_rank()
    if env_world_size() > 1:
        try:
            return int(os.environ.get("RANK", "0"))
        except ValueError:
            return 0
    return 0


def group_rank() -> int:
    """This process's rank in the live process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (or without distribution): the process that writes files and prints."""
    return rank() == 0


def setup(device_type: str = "cpu") -> bool:
    """Join the process group ``torchrun`` prepared, if any; True when this call created it.

    ``gloo`` is used for CPU training and ``nccl`` for CUDA.
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise HeadgraftError("this PyTorch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def teardown(owned: bool) -> None:
    """Leave the process group if :func:`setup` created it."""
    if owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device(device_type: str) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA, else the device type itself."""
    if device_type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device_type)


def _comm_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(n: int) -> torch.Tensor:
    """Indices ``0..n-1`` this rank handles (every ``world_size``-th one)."""
    if not is_distributed():
        return torch.arange(n)
    return torch.arange(rank(), n, world_size())


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (first dims may differ), rank order."""
    if not is_distributed():
        return t
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes_i), *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.to(dev)
    out = [torch.empty_like(pad) for _ in sizes_i]
    dist.all_gather(out, pad)
    return torch.cat([o[:s] for o, s in zip(out, sizes_i)]).to(t.device)


def unshard(parts: torch.Tensor, n: int) -> torch.Tensor:
    """Put rows gathered from :func:`shard` slices (rank order) back in example order."""
    if not is_distributed():
        return parts
    order = torch.cat([torch.arange(r, n, world_size()) for r in range(world_size())])
    out = torch.empty_like(parts)
    out[order] = parts
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (a new tensor on the input's device)."""
    if not is_distributed():
        return t
    x = t.to(_comm_device()).clone()
    dist.all_reduce(x)
    return x.to(t.device)


def all_reduce_stats(stats: ClassStats) -> ClassStats:
    """Statistics of all ranks' examples: counts, sums and second moments are added."""
    if not is_distributed():
        return stats
    return ClassStats(
        stats.labels,
        all_reduce_sum(stats.counts),
        all_reduce_sum(stats.sums),
        all_reduce_sum(stats.second),
    )


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def same_on_all_ranks(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every rank holds bit-identical tensors (a cheap checksum comparison)."""
    if not is_distributed():
        return True
    sums = torch.stack(
        [t.detach().double().sum().cpu() for t in tensors] or [torch.zeros((), dtype=torch.float64)]
    )
    mx = all_reduce_max(sums)
    mn = -all_reduce_max(-sums)
    return bool(torch.equal(mx, mn))


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    x = t.to(_comm_device()).clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.to(t.device)
