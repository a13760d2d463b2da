"""Export: ONNX Runtime / TorchScript agree with PyTorch, labels travel inside the file."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

import headgraft as hg
from headgraft.cli import main
from headgraft.errors import InputError
from headgraft.io.export import (
    EXPORT_FORMATS,
    example_inputs,
    export,
    exported_labels,
    read_metadata,
    run_exported,
)
from headgraft.multilabel import METADATA_KEY, mark_multilabel


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"},
        label2id={"neg": 0, "neu": 1, "pos": 2},
    )
    return BertForSequenceClassification(config).eval()


def _timm() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()


def _torchvision() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.squeezenet1_1(num_classes=4).eval()


def _features() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


# one row per model family: (builder, test inputs other than the export's example batch, the
# ONNX exporter: the default torch.export-based one where it matters most, the faster legacy one
# for the image families to keep the suite affordable on two cores)
def _text_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (6, 13), generator=g)
    mask = torch.ones(6, 13, dtype=torch.long)
    mask[2, 7:] = 0
    mask[4, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _image_batch(size: int) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"pixel_values": torch.randn(5, 3, size, size)}


FAMILIES = {
    "transformers": (_tiny_bert, _text_batch, True),
    "timm": (_timm, _image_batch(160), False),
    "torchvision": (_torchvision, _image_batch(224), False),
    "features": (_features, lambda: {"features": torch.randn(7, 24)}, True),
}


def _torch_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if "input_ids" in batch:
            return model(**batch).logits
        return model(next(iter(batch.values())))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_grown_model_exports_and_agrees(family: str, fmt: str, tmp_path) -> None:
    build, batch_of, dynamo = FAMILIES[family]
    model = build()
    old = hg.labels(model).names
    model = hg.add_classes(model, ["new_a", "new_b"], seed=0)
    out = tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}"
    result = export(model, out, fmt, options={"dynamo": dynamo})
    assert result.path == out and out.is_file()
    assert result.argmax_agree == 1.0 and result.max_abs_diff < 1e-4
    assert exported_labels(out).names == [*old, "new_a", "new_b"]
    meta = read_metadata(out)
    assert json.loads(meta["id2label"])[str(len(old) + 1)] == "new_b"
    # other batch sizes (and sequence lengths) than the example the graph was traced with
    batch = batch_of()
    got = run_exported(out, fmt, batch)
    ref = _torch_logits(model, batch)
    assert got.shape == ref.shape == (len(next(iter(batch.values()))), len(old) + 2)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert torch.allclose(got, ref, atol=1e-4)


def test_legacy_onnx_exporter_also_works_for_text(tmp_path) -> None:
    model = hg.add_classes(_tiny_bert(), ["x"], seed=0)
    result = export(model, tmp_path / "legacy.onnx", options={"dynamo": False})
    batch = _text_batch()
    assert result.argmax_agree == 1.0
    assert torch.equal(
        run_exported(result.path, "onnx", batch).argmax(-1), _torch_logits(model, batch).argmax(-1)
    )


def test_text_inputs_follow_the_tokenizer(tmp_path) -> None:
    class NoTypes:
        model_input_names = ["input_ids", "attention_mask"]

    model = _tiny_bert()
    assert example_inputs(model).names == ("input_ids", "attention_mask", "token_type_ids")
    assert example_inputs(model, tokenizer=NoTypes()).names == ("input_ids", "attention_mask")


def test_multilabel_thresholds_travel_in_the_metadata(tmp_path) -> None:
    model = _features()
    hg.set_labels(model, hg.LabelMap(["a", "b", "c", "d"]))
    mark_multilabel(model, {"a": 0.3, "c": 0.7})
    meta = read_metadata(export(model, tmp_path / "ml.onnx", options={"dynamo": False}).path)
    assert meta["problem_type"] == "multi_label_classification"
    assert json.loads(meta[METADATA_KEY]) == {"a": 0.3, "b": 0.5, "c": 0.7, "d": 0.5}


def test_bad_requests_are_input_errors(tmp_path) -> None:
    model = _features()
    with pytest.raises(InputError, match="choose one of: onnx, torchscript"):
        export(model, tmp_path / "m.onnx", "tflite")
    with pytest.raises(InputError, match="label names for a head with 4 outputs"):
        export(model, tmp_path / "m.onnx", labels=["a", "b"])
    existing = tmp_path / "there.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        export(model, existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(InputError, match="input_shape"):
        example_inputs(nn.Sequential(nn.ReLU()))
    assert sorted(EXPORT_FORMATS.names()) == ["onnx", "torchscript"]
    assert list(tmp_path.iterdir()) == [existing]  # nothing partial left behind


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("hf") / "grown"
    model = hg.add_classes(_tiny_bert(), ["sarcastic"], seed=0)
    model.save_pretrained(folder)
    return str(folder)


def test_cli_exports_a_hugging_face_folder(hf_folder, tmp_path, capsys) -> None:
    out = tmp_path / "served.onnx"
    assert main(["export", hf_folder, "-o", str(out), "--no-dynamo", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labels"] == ["neg", "neu", "pos", "sarcastic"]
    assert report["argmax_agree"] == 1.0
    assert exported_labels(out).names == report["labels"]
    # TorchScript, and the same file again: refused without --force, replaced with it
    ts = tmp_path / "served.pt"
    assert main(["export", hf_folder, "-f", "torchscript", "-o", str(ts)]) == 0
    before = ts.read_bytes()
    assert main(["export", hf_folder, "-f", "torchscript", "-o", str(ts)]) == 2
    assert "--force" in capsys.readouterr().err and ts.read_bytes() == before
    assert main(["export", hf_folder, "-f", "torchscript", "-o", str(ts), "--force"]) == 0


def test_cli_exports_a_bare_head_checkpoint(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    head = tmp_path / "head.safetensors"
    torch.manual_seed(0)
    lin = nn.Linear(12, 3)
    save_file(
        {"weight": lin.weight.detach(), "bias": lin.bias.detach()},
        str(head),
        metadata={"labels": json.dumps(["x", "y", "z"])},
    )
    out = tmp_path / "head.onnx"
    args = ["export", str(head), "--input-shape", "12", "-o", str(out), "--no-dynamo", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == ["features"] and report["argmax_agree"] == 1.0
    assert report["labels"] == ["x", "y", "z"] == exported_labels(out).names
    x = torch.randn(9, 12)
    got = run_exported(out, "onnx", {"features": x})
    assert torch.equal(got.argmax(-1), lin(x).argmax(-1))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-f", "tflite"], "unknown export format 'tflite'"),
        (["--input-shape", "3,a"], "--input-shape"),
    ],
)
def test_cli_bad_usage_exits_2(hf_folder, tmp_path, capsys, args, message) -> None:
    out = tmp_path / "x.onnx"
    assert main(["export", hf_folder, "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
