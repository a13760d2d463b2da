"""Run by tests/learn/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank learns digits 7-9 into the digits 0-6 MLP with exemplar replay and a trainable
backbone; rank 0 saves the model as safetensors; every rank writes a checksum of its weights.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

from headgraft.data import digits
from headgraft.demo import train_base
from headgraft.learn import distributed as D
from headgraft.learn import learn


def main(out: str) -> None:
    torch.set_num_threads(1)
    split = digits()
    base = train_base(split, list(range(7)), epochs=20, seed=0)
    base.headgraft_labels = [str(c) for c in range(7)]
    x_old, y_old = split.select(list(range(7)))
    x_new, y_new = split.select([7, 8, 9])
    result = learn(
        base,
        (x_new, [str(int(c)) for c in y_new]),
        recipe="replay",
        regime="full",
        old_data=(x_old, y_old),
        epochs=2,
        seed=0,
        device="cpu",
        checkpoint_dir=out,
    )
    model = result.model
    rank = int(os.environ["RANK"])
    sums = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    info = {
        "rank": rank,
        "world": result.resolved["world_size"],
        "sums": sums,
        "memory": result.memory.indices.tolist(),
        "history": result.history,
        "distributed_during_run": D.env_world_size(),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    if rank == 0:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out, "model.safetensors"),
            metadata={"labels": json.dumps(result.labels)},
        )


if __name__ == "__main__":
    main(sys.argv[1])
