"""A real 2-process `torchrun` run (gloo on CPU): it trains, ranks agree, the result loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from headgraft.data import digits
from headgraft.demo import digits_mlp

SCRIPT = Path(__file__).with_name("ddp_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_two_processes_train_and_the_result_loads(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        *_torchrun(),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(SCRIPT),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # DDP kept the replicas in step, and the exemplar selection was the same on both ranks
    assert ranks[0]["sums"] == ranks[1]["sums"]
    assert ranks[0]["memory"] == ranks[1]["memory"] and len(ranks[0]["memory"]) == 140
    assert len(ranks[0]["history"]) == 2 and (tmp_path / "last.pt").is_file()
    # the saved model loads into a plain 10-class MLP and classifies old and new digits
    state = load_file(str(tmp_path / "model.safetensors"))
    model = digits_mlp(10)
    model.load_state_dict(state)
    split = digits()
    with torch.no_grad():
        pred = model(split.x_test).argmax(1)
    old = split.y_test < 7
    assert float((pred == split.y_test)[old].float().mean()) > 0.85
    assert float((pred == split.y_test)[~old].float().mean()) > 0.85
