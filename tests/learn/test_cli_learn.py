"""`headgraft learn` and `headgraft evaluate` on real files: a head checkpoint and feature files
(the embedding-pipeline case: the model is just its head), through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from headgraft.cli import main
from headgraft.io.sources import write_state_dict
from headgraft.stats import ClassStats

OLD = [str(c) for c in range(7)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, scenario) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli_learn")
    base = scenario.base
    with torch.no_grad():
        f_old = base[:4](scenario.x_old)
        f_new = base[:4](scenario.x_new)
        f_test = base[:4](scenario.split.x_test)

    def npz(name: str, feats: torch.Tensor, labels: list[str]) -> Path:
        path = d / name
        np.savez(path, features=feats.numpy(), labels=np.array(labels))
        return path

    paths = {
        "head": d / "head.safetensors",
        "new": npz("new.npz", f_new, scenario.y_new),
        "old": npz("old.npz", f_old, [str(int(c)) for c in scenario.y_old]),
        "test": npz("test.npz", f_test, [str(int(c)) for c in scenario.split.y_test]),
        "stats": d / "old-stats.safetensors",
    }
    write_state_dict(base[4].state_dict(), paths["head"], OLD)
    ClassStats.from_features(f_old, scenario.y_old, OLD).save(paths["stats"])
    return paths


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_learn_data_free_then_evaluate(tmp_path, files, capsys) -> None:
    out = tmp_path / "grown.safetensors"
    code, text, err = _run(
        [
            "learn",
            str(files["head"]),
            "--data",
            str(files["new"]),
            "--stats",
            str(files["stats"]),
            "--test",
            str(files["test"]),
            "-o",
            str(out),
            "--json",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(text)
    assert result["labels"] == [str(c) for c in range(10)]
    assert result["resolved"]["solve"] == "stats" and result["after"]["all_accuracy"] >= 0.945
    assert result["before"]["new_accuracy"] == 0.0
    weights = load_file(str(out))
    assert weights["weight"].shape == (10, 128)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["labels"]) == result["labels"]
    # evaluate the written file on its own, with forgetting against the original head
    code, text, err = _run(
        [
            "evaluate",
            str(out),
            "--data",
            str(files["test"]),
            "--old-labels",
            ",".join(OLD),
            "--reference",
            str(files["head"]),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(text)
    assert report["all_accuracy"] == pytest.approx(result["after"]["all_accuracy"])
    assert report["new_labels"] == ["7", "8", "9"] and report["forgetting"] is not None
    assert len(report["confusion"]) == 10


def test_learn_with_exemplars_writes_the_memory(tmp_path, files, capsys) -> None:
    out, mem = tmp_path / "grown.safetensors", tmp_path / "memory.json"
    code, text, err = _run(
        [
            "learn",
            str(files["head"]),
            "--data",
            str(files["new"]),
            "--old-data",
            str(files["old"]),
            "--memory-per-class",
            "5",
            "--memory-out",
            str(mem),
            "--epochs",
            "2",
            "--solve",
            "none",
            "--freeze",
            "old-rows",
            "-o",
            str(out),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert "learned 7, 8, 9" in text and "pass --test" in text
    memory = json.loads(mem.read_text())
    assert len(memory["indices"]) == 35 and memory["source"] == str(files["old"])
    grown, base = load_file(str(out)), load_file(str(files["head"]))
    assert torch.equal(grown["weight"][:7], base["weight"])  # old rows frozen: bit-identical
    assert (tmp_path / "grown.safetensors.learn-checkpoint" / "last.pt").is_file()


def test_bad_input_is_one_line_with_exit_code_2(tmp_path, files, capsys) -> None:
    out = tmp_path / "x.safetensors"
    cases = [
        (["--recipe", "magic"], "unknown recipe 'magic'; choose one of"),
        (["--freeze", "old-rows", "--epochs", "2"], "collapses the old classes"),
        (["--memory", str(tmp_path / "m.json")], "pass --old-data"),
    ]
    for extra, message in cases:
        code, _, err = _run(
            ["learn", str(files["head"]), "--data", str(files["new"]), "-o", str(out), *extra],
            capsys,
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code, _, err = _run(
        ["learn", str(files["head"]), "--data", str(files["new"]), "-o", str(files["head"])], capsys
    )
    assert code == 2 and not err.count("\n") > 1


def test_the_installed_command_runs(tmp_path, files) -> None:
    out = tmp_path / "grown.safetensors"
    exe = Path(sys.executable).with_name("headgraft")
    proc = subprocess.run(
        [
            str(exe),
            "learn",
            str(files["head"]),
            "--data",
            str(files["new"]),
            "--stats",
            str(files["stats"]),
            "--test",
            str(files["test"]),
            "-o",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "all classes" in proc.stdout and out.is_file()
