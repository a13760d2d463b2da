"""Image folders end to end on real scans: a timm model through the installed command line.

scikit-learn's handwritten digits (8x8 scans) are written as 32x32 PNGs into class folders;
a timm ``test_convnext`` whose head was fitted on digits 0-6 is saved as a checkpoint and
driven with ``--arch timm:test_convnext``. The tests check that timm's own preprocessing is
applied, that ``stats``, ``add --data`` and ``learn`` share one feature cache (a second run
makes no forward pass: a factory that builds the same timm model with a marker hook proves
it), and that every output is bit-identical with and without the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ARCH = "test_convnext"
OLD, NEW = [str(c) for c in range(7)], ["7", "8", "9"]
PER_CLASS = 10
SCRIPT = Path(sys.executable).with_name("headgraft")

MARKER_FACTORY = f'''
import os

import timm


def build(num_classes=None):
    """timm's {ARCH}, with a hook that records every forward pass in $HG_MARKER."""
    model = timm.create_model("{ARCH}", pretrained=False, num_classes=num_classes or 7)

    def mark(*_):
        with open(os.environ["HG_MARKER"], "a") as f:
            f.write("forward\\n")

    model.stem.register_forward_pre_hook(mark)
    return model
'''


@dataclass
class World:
    root: Path
    base: Path  # weights of the model trained on the old digits

    def run(self, *args: str, marker: Path | None = None) -> dict[str, Any]:
        env = {**os.environ, "HEADGRAFT_CACHE": str(self.root / "default-cache")}
        if marker is not None:
            env["HG_MARKER"] = str(marker)
        cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "headgraft"]
        proc = subprocess.run(
            [*cmd, *args, "--json"],
            capture_output=True,
            text=True,
            cwd=self.root,  # the marker factory is imported from here
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


def _write_digits(root: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for part, classes in (("old", OLD), ("new", NEW)):
        for c in classes:
            folder = root / part / c
            folder.mkdir(parents=True)
            for i in np.nonzero(d.target == int(c))[0][:PER_CLASS]:
                img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8))
                img.resize((32, 32), Image.Resampling.BICUBIC).save(folder / f"{i}.png")


def _timm_features(model: torch.nn.Module, folder: Path) -> tuple[torch.Tensor, list[str]]:
    """Head inputs computed with timm's own API: its transform, forward_head(pre_logits)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    files = sorted(folder.glob("*/*.png"))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return feats, [f.parent.name for f in files]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    import timm

    from headgraft.io.sources import write_state_dict

    root = tmp_path_factory.mktemp("images-e2e")
    _write_digits(root)
    (root / "hg_marker.py").write_text(MARKER_FACTORY)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(OLD)).eval()
    feats, names = _timm_features(model, root / "old")
    y = torch.tensor([OLD.index(n) for n in names])
    head = model.head.fc  # fit the head on the old digits (logistic regression, L-BFGS)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        accuracy = (head(feats).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, accuracy  # a trained classifier of the old classes
    base = root / "base.safetensors"
    write_state_dict(model.state_dict(), base, OLD)
    return World(root, base)


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_timm_preprocessing_is_what_the_image_folder_applies(world: World) -> None:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from headgraft.data import load_data
    from headgraft.io.sources import load_model

    loaded = load_model(str(world.base), arch=f"timm:{ARCH}")
    config = resolve_data_config({}, model=loaded.model)
    assert config["input_size"] == (3, 160, 160) and config["mean"] == (0.5, 0.5, 0.5)
    src = load_data(world.root / "old", loaded=loaded, batch_size=4)
    x, names = next(iter(src))
    expected = create_transform(**config)(Image.open(src.files[0]).convert("RGB"))
    assert x.shape == (4, 3, 160, 160) and names == ["0"] * 4
    assert torch.equal(x[0], expected)


def test_stats_add_learn_share_the_cache_and_match_uncached_runs(world: World) -> None:
    r = world.root
    cache = r / "cache"
    marker = r / "forward.log"
    timm_arch = ["--arch", f"timm:{ARCH}"]
    marked_arch = ["--arch", "hg_marker:build"]
    with_cache = ["--cache-dir", str(cache)]

    # stats: computed once (timm's preprocessing, as timm's own API computes it) ...
    first = world.run("stats", str(world.base), *timm_arch, "--data", "old", "-o", "s1.safetensors",
                      *with_cache)  # fmt: skip
    assert first["cache"]["misses"] == 1 and first["cache"]["hits"] == 0
    assert len(list(cache.rglob("*.safetensors"))) == 1
    from headgraft.stats import ClassStats

    s1 = ClassStats.load(r / "s1.safetensors")
    import timm

    model = timm.create_model(ARCH, pretrained=False, num_classes=len(OLD)).eval()
    model.load_state_dict(load_file(world.base))
    feats, names = _timm_features(model, r / "old")
    reference = ClassStats.from_features(feats, torch.tensor([OLD.index(n) for n in names]), OLD)
    assert s1.labels == OLD and torch.equal(s1.counts, reference.counts)
    assert torch.allclose(s1.means(), reference.means(), atol=1e-5)

    # ... read back without a forward pass, and bit-identical to a run without the cache
    second = world.run("stats", str(world.base), *marked_arch, "--data", "old",
                       "-o", "s2.safetensors", *with_cache, marker=marker)  # fmt: skip
    assert second["cache"]["hits"] == 1 and second["cache"]["misses"] == 0
    assert not marker.exists()  # the model never ran
    third = world.run("stats", str(world.base), *marked_arch, "--data", "old",
                      "-o", "s3.safetensors", "--no-cache", marker=marker)  # fmt: skip
    assert third["cache"] is None and marker.read_text().count("forward") >= 1
    assert _same_tensors(r / "s1.safetensors", r / "s2.safetensors")
    assert _same_tensors(r / "s1.safetensors", r / "s3.safetensors")

    # add --data (imprint): computes the new digits' features and stores them
    grown = world.run("add", str(world.base), *timm_arch, "--data", "new", "--labels",
                      ",".join(NEW), "-o", "g1.safetensors", *with_cache)  # fmt: skip
    assert grown["cache"]["misses"] == 1 and grown["init"] == "auto"
    assert grown["labels"] == OLD + NEW and grown["verified"]["rows_verified"] == len(OLD)
    world.run("add", str(world.base), *timm_arch, "--data", "new", "--labels", ",".join(NEW),
              "-o", "g2.safetensors", "--no-cache")  # fmt: skip
    assert _same_tensors(r / "g1.safetensors", r / "g2.safetensors")

    # learn (frozen regime) on the grown model: the backbone is the same, so the features
    # that `add` stored are read back and the model never runs on the training data
    marker.unlink()
    learn_args = ["--data", "new", "--new-labels", ",".join(NEW), "--stats", "s1.safetensors",
                  "--epochs", "2", "--no-progress"]  # fmt: skip
    learned = world.run("learn", "g1.safetensors", *marked_arch, *learn_args,
                        "-o", "l1.safetensors", *with_cache, marker=marker)  # fmt: skip
    assert learned["resolved"]["regime"] == "frozen"
    assert learned["cache"]["hits"] == 1 and learned["cache"]["misses"] == 0
    assert not marker.exists()
    assert learned["labels"] == OLD + NEW
    world.run("learn", "g1.safetensors", *marked_arch, *learn_args, "-o", "l2.safetensors",
              "--no-cache", marker=marker)  # fmt: skip
    assert marker.exists()
    assert _same_tensors(r / "l1.safetensors", r / "l2.safetensors")
    assert len(list(cache.rglob("*.safetensors"))) == 2  # old digits, new digits
    assert not (r / "default-cache").exists()  # --cache-dir replaced the default
