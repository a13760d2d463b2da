"""Checkpoint files: safe reading, head tensors by name or shape, streaming safetensors surgery."""

from __future__ import annotations

import argparse
import errno
import json
import os
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from headgraft.errors import AmbiguousHeadError, HeadNotFoundError, InputError, UnsafeFileError
from headgraft.io import checkpoint
from headgraft.io.checkpoint import (
    DTYPES,
    HeadStack,
    clean_name,
    find_head_tensors,
    head_model,
    load_torch_file,
    open_checkpoint,
    read_header,
    rewrite_safetensors,
    unwrap_state_dict,
)
from headgraft.labels import model_labels


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _mlp_state(n: int = 5, d: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "body.0.weight": torch.randn(16, 12, generator=g),
        "body.0.bias": torch.randn(16, generator=g),
        "body.2.weight": torch.randn(d, 16, generator=g),
        "body.2.bias": torch.randn(d, generator=g),
        "norm.running_mean": torch.zeros(d),
        "fc.weight": torch.randn(n, d, generator=g),
        "fc.bias": torch.randn(n, generator=g),
    }


# ----------------------------------------------------------------------------- names and pickles


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("module.fc.weight", "fc.weight"),
        ("module.module.fc.bias", "fc.bias"),
        ("_orig_mod.fc.weight", "fc.weight"),
        ("module._orig_mod.head.fc.bias", "head.fc.bias"),
        ("pre_module.fc.weight", "pre_module.fc.weight"),
    ],
)
def test_clean_name_strips_wrapper_prefixes_only(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_unwrap_finds_the_state_dict_in_a_training_checkpoint(key: str) -> None:
    sd = _mlp_state()
    keys, found = unwrap_state_dict({key: sd, "epoch": 3, "optimizer": {"state": {}}})
    assert keys == (key,) and found is sd


def test_unwrap_without_a_state_dict_names_the_keys() -> None:
    with pytest.raises(InputError, match="top-level keys: epoch, args"):
        unwrap_state_dict({"epoch": 3, "args": [1]}, "x.pt")


def test_pickled_objects_are_refused_with_the_reason_and_the_flag(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": _mlp_state()}, path)
    with pytest.raises(UnsafeFileError, match=r"argparse\.Namespace.*--trust-pickle") as e:
        load_torch_file(path)
    assert "\n" not in str(e.value)
    obj = load_torch_file(path, trust_pickle=True)
    assert obj["args"].lr == 0.1


class _Payload:
    """Unpickling this runs code: it would create a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_malicious_pickle_is_never_executed(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _mlp_state(), "x": _Payload(str(marker))}, path)
    with pytest.raises(UnsafeFileError, match="--trust-pickle"):
        open_checkpoint(path)
    assert not marker.exists()


def test_corrupt_and_truncated_torch_files_are_input_errors(tmp_path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_mlp_state(), good)
    (tmp_path / "half.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for name in ("half.pt", "junk.pt"):
        with pytest.raises(InputError) as e:
            open_checkpoint(tmp_path / name)
        assert not isinstance(e.value, UnsafeFileError) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- safetensors


def test_truncated_and_corrupt_safetensors_are_detected(tmp_path) -> None:
    good = tmp_path / "good.safetensors"
    save_file(_mlp_state(), good)
    data = good.read_bytes()
    cases = {
        "trunc": data[:-10],
        "header": data[:8] + b"{not json" + data[17:],
        "tiny": data[:5],
        "huge": (10**12).to_bytes(8, "little") + data[8:],
    }
    for name, blob in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
        with pytest.raises(InputError, match="truncated or corrupt"):
            read_header(tmp_path / f"{name}.safetensors")


def test_rewrite_replaces_the_head_and_copies_every_other_tensor_bit_for_bit(tmp_path) -> None:
    sd = _mlp_state()
    src = tmp_path / "in.safetensors"
    save_file(sd, src, metadata={"format": "pt", "note": "kept"})
    grown_w = torch.cat([sd["fc.weight"], torch.ones(2, 8)])
    grown_b = torch.cat([sd["fc.bias"], torch.zeros(2)])
    dst = tmp_path / "out.safetensors"
    rewrite_safetensors(
        read_header(src),
        dst,
        {"fc.weight": grown_w, "fc.bias": grown_b},
        {"format": "pt", "note": "kept", "labels": "[]"},
    )
    out = load_file(dst)
    assert set(out) == set(sd)
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert _bits(out[k]) == _bits(v), k
    assert torch.equal(out["fc.weight"], grown_w) and torch.equal(out["fc.bias"], grown_b)
    header = read_header(dst)
    assert header.metadata["note"] == "kept" and header.data_start % 8 == 0


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 5)), min_size=1, max_size=5),
    dtypes=st.lists(
        st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64"]), min_size=5, max_size=5
    ),
    head_rows=st.integers(1, 6),
    extra=st.integers(0, 4),
)
def test_rewrite_property_any_layout(tmp_path_factory, shapes, dtypes, head_rows, extra) -> None:
    """Whatever the tensors' shapes and dtypes, surgery keeps the others exact and the file
    valid for the safetensors library."""
    tmp = tmp_path_factory.mktemp("prop")
    g = torch.Generator().manual_seed(len(shapes))
    sd = {
        f"t{i}": (torch.randn(*s, generator=g) * 50).to(DTYPES[dt])
        for i, (s, dt) in enumerate(zip(shapes, dtypes))
    }
    sd["head.weight"] = torch.randn(head_rows, 3, generator=g).half()
    save_file(sd, tmp / "a.safetensors")
    new = torch.randn(head_rows + extra, 3, generator=g).half()
    rewrite_safetensors(
        read_header(tmp / "a.safetensors"),
        tmp / "b.safetensors",
        {"head.weight": new},
        {"format": "pt"},
    )
    out = load_file(tmp / "b.safetensors")
    assert _bits(out["head.weight"]) == _bits(new)
    for k, v in sd.items():
        if k != "head.weight":
            assert out[k].dtype == v.dtype and _bits(out[k]) == _bits(v)


def _big_state(head_rows: int = 5) -> dict[str, torch.Tensor]:
    """One tensor long enough to be worth aligning, the head after it, a small one last (the
    safetensors writer orders tensors by name): two unchanged runs around the head."""
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(checkpoint._ALIGN_FROM // 4 + 1000, generator=g),
        "fc.bias": torch.randn(head_rows, generator=g),
        "fc.weight": torch.randn(head_rows, 8, generator=g),
        "z.weight": torch.randn(3, 7, generator=g),
    }


def _grown(sd: dict[str, torch.Tensor], k: int = 2) -> dict[str, torch.Tensor]:
    return {
        "fc.weight": torch.cat([sd["fc.weight"], torch.ones(k, 8)]),
        "fc.bias": torch.cat([sd["fc.bias"], torch.zeros(k)]),
    }


def _page_offset(header, name: str) -> int:
    return (header.data_start + header.entries[name].begin) % checkpoint._ALIGN


def test_rewrite_keeps_the_longest_run_at_its_page_offset_with_a_padded_header(
    tmp_path, monkeypatch
) -> None:
    """The header is padded with spaces so the big unchanged tensor sits at the same offset
    modulo the page size as in the input; the in-kernel and the buffered copy give the same
    bytes, and the file is valid for safe_open and load_file."""
    sd = _big_state()
    src = tmp_path / "in.safetensors"
    save_file(sd, src, metadata={"format": "pt"})
    grown = _grown(sd)
    meta = {"format": "pt", "labels": json.dumps(list("abcdefg"))}  # the header grows
    outputs = {}
    for in_kernel in (True, False):
        monkeypatch.setattr(checkpoint, "_IN_KERNEL", in_kernel)
        outputs[in_kernel] = tmp_path / f"out-{in_kernel}.safetensors"
        rewrite_safetensors(read_header(src), outputs[in_kernel], grown, meta)
    dst = outputs[True]
    assert dst.read_bytes() == outputs[False].read_bytes()
    before, after = read_header(src), read_header(dst)
    assert _page_offset(after, "a.weight") == _page_offset(before, "a.weight")
    assert after.data_start % 8 == 0 and after.data_start > before.data_start
    raw = dst.read_bytes()[8 : after.data_start]  # JSON, then only spaces up to the data
    assert json.loads(raw)["a.weight"]["data_offsets"][0] == 0 and raw.rstrip(b" ")[-1:] == b"}"
    assert set(list(after.entries)[-2:]) == {"fc.bias", "fc.weight"}  # replaced ones go last
    out = load_file(dst)
    assert _bits(out["a.weight"]) == _bits(sd["a.weight"]) and torch.equal(
        out["z.weight"], sd["z.weight"]
    )
    assert torch.equal(out["fc.weight"], grown["fc.weight"])
    with safe_open(str(dst), "pt") as f:
        assert sorted(f.keys()) == sorted(sd) and f.metadata() == meta


def test_small_files_get_no_alignment_padding(tmp_path) -> None:
    sd = _mlp_state()
    src = tmp_path / "in.safetensors"
    save_file(sd, src)
    dst = tmp_path / "out.safetensors"
    rewrite_safetensors(read_header(src), dst, {"fc.bias": sd["fc.bias"] + 1}, {})
    head = dst.read_bytes()[: read_header(dst).data_start]
    assert len(head) - len(head.rstrip(b" ")) < 8


@pytest.mark.parametrize(
    "failure", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, "short"]
)
def test_a_refused_in_kernel_copy_falls_back_to_the_buffer_midway(
    tmp_path, monkeypatch, failure
) -> None:
    """copy_file_range copies part of the run and then refuses (another file system, an old
    kernel) or copies nothing more: the rest goes through the buffer, the file is identical."""
    sd = _big_state()
    src = tmp_path / "in.safetensors"
    save_file(sd, src, metadata={"format": "pt"})
    reference = tmp_path / "reference.safetensors"
    monkeypatch.setattr(checkpoint, "_IN_KERNEL", False)
    rewrite_safetensors(read_header(src), reference, _grown(sd), {"format": "pt"})

    real = os.copy_file_range
    calls = []

    def flaky(src_fd, dst_fd, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) <= 2:  # the bytes up to the page boundary, then 1 MiB more
            return real(src_fd, dst_fd, min(count, 1 << 20), offset_src, offset_dst)
        if failure == "short":
            return 0
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(checkpoint, "_IN_KERNEL", True)
    monkeypatch.setattr(os, "copy_file_range", flaky, raising=False)
    dst = tmp_path / "out.safetensors"
    rewrite_safetensors(read_header(src), dst, _grown(sd), {"format": "pt"})
    assert len(calls) == 3
    assert dst.read_bytes() == reference.read_bytes()


def test_sharded_hf_checkpoint_with_an_aligned_shard_loads_with_from_pretrained(tmp_path) -> None:
    """A Hugging Face model saved in shards, the head's shard holding an 8 MiB layer: the
    grown folder loads with from_pretrained (no ignore_mismatched_sizes), every other tensor
    bit-identical, the old head rows too, and the big layer kept at its page offset."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=8192,
        num_labels=3,
    )
    model = AutoModelForSequenceClassification.from_config(config).eval()
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="10MB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["classifier.weight"]
    big = "bert.encoder.layer.0.output.dense.weight"
    assert index["weight_map"][big] == shard and len(set(index["weight_map"].values())) > 1

    ckpt = open_checkpoint(src / "model.safetensors.index.json")
    w, b = ckpt.tensor("classifier.weight"), ckpt.tensor("classifier.bias")
    grown = {
        "classifier.weight": torch.cat([w, torch.randn(2, 256)]),
        "classifier.bias": torch.cat([b, torch.zeros(2)]),
    }
    out = tmp_path / "grown"
    ckpt.write(out, grown, ["LABEL_0", "LABEL_1", "LABEL_2", "x", "y"])
    assert _page_offset(read_header(out / shard), big) == _page_offset(
        read_header(src / shard), big
    )

    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert loaded.config.num_labels == 5 and loaded.config.id2label[4] == "y"
    new_sd, old_sd = loaded.state_dict(), model.state_dict()
    for k, v in old_sd.items():
        if not k.startswith("classifier."):
            assert _bits(new_sd[k]) == _bits(v), k
    assert _bits(new_sd["classifier.weight"]) == _bits(grown["classifier.weight"])
    assert _bits(new_sd["classifier.weight"][:3]) == _bits(w)


# ----------------------------------------------------------------------------- head tensors


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_shape_rule_finds_the_layer_whose_output_nothing_reads() -> None:
    (h,) = find_head_tensors(_shapes(_mlp_state()))
    assert (h.prefix, h.weight, h.bias, h.num_classes, h.in_features) == (
        "fc",
        "fc.weight",
        "fc.bias",
        5,
        8,
    )


def test_shape_rule_with_a_label_count_and_a_clear_error_for_two_candidates() -> None:
    sd = _mlp_state(n=5)
    sd["aux.weight"], sd["aux.bias"] = torch.zeros(5, 16), torch.zeros(5)
    with pytest.raises(AmbiguousHeadError, match=r"fc, aux.*--head"):
        find_head_tensors(_shapes(sd))
    with pytest.raises(AmbiguousHeadError):
        find_head_tensors(_shapes(sd), num_classes=5)
    (h,) = find_head_tensors(_shapes(sd), head="aux")
    assert h.in_features == 16
    both = find_head_tensors(_shapes(sd), head="fc.weight,aux")
    assert [h.prefix for h in both] == ["fc", "aux"]


def test_named_head_errors_list_the_candidates() -> None:
    with pytest.raises(HeadNotFoundError, match=r"no tensor 'clf.weight'.*could mean: .*fc"):
        find_head_tensors(_shapes(_mlp_state()), head="clf")
    with pytest.raises(HeadNotFoundError, match="not a classifier weight"):
        find_head_tensors({"emb.weight": (10, 4, 3)}, head="emb")


def test_conv1x1_heads_and_root_layers() -> None:
    (h,) = find_head_tensors(
        {
            "features.weight": (64, 3, 3, 3),
            "classifier.1.weight": (10, 64, 1, 1),
            "classifier.1.bias": (10,),
        }
    )
    assert h.conv and h.num_classes == 10 and h.prefix == "classifier.1"
    (root,) = find_head_tensors({"weight": (4, 32), "bias": (4,)})
    assert root.prefix == ""


def test_head_model_holds_the_tensors_and_labels() -> None:
    sd = _mlp_state()
    ckpt = _MemoryCheckpoint(sd)
    heads = find_head_tensors(_shapes(sd))
    model, path = head_model(ckpt, heads, ["a", "b", "c", "d", "e"])
    assert isinstance(model, HeadStack) and path == "fc"
    assert torch.equal(model.fc.weight, sd["fc.weight"])
    assert model_labels(model, path).names == ["a", "b", "c", "d", "e"]
    x = torch.randn(3, 8)
    assert torch.allclose(model(x), x @ sd["fc.weight"].T + sd["fc.bias"])


class _MemoryCheckpoint:
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = sd

    def tensor(self, name: str) -> torch.Tensor:
        return self.sd[name]


# ----------------------------------------------------------------------------- formats


def test_torch_checkpoint_write_keeps_the_container_prefixes_and_labels(tmp_path) -> None:
    sd = OrderedDict((f"module.{k}", v) for k, v in _mlp_state().items())
    torch.save({"state_dict": sd, "epoch": 7}, tmp_path / "in.pth")
    ckpt = open_checkpoint(tmp_path / "in.pth")
    assert ckpt.format == "torch" and "fc.weight" in ckpt.names()
    w = torch.cat([ckpt.tensor("fc.weight"), torch.zeros(1, 8)])
    b = torch.cat([ckpt.tensor("fc.bias"), torch.zeros(1)])
    ckpt.write(tmp_path / "out.pth", {"fc.weight": w, "fc.bias": b}, list("abcdef"))
    raw = torch.load(tmp_path / "out.pth", weights_only=True)
    assert raw["epoch"] == 7 and torch.equal(raw["state_dict"]["module.fc.weight"], w)
    again = open_checkpoint(tmp_path / "out.pth")
    assert again.labels() == list("abcdef")


def test_sharded_checkpoint_rewrites_only_the_head_shard(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    sd = _mlp_state()
    shard1 = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    shard2 = {k: v for k, v in sd.items() if k.startswith("fc.")}
    save_file(shard1, src / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(shard2, src / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    total = sum(v.numel() * 4 for v in sd.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {
            **{k: "model-00001-of-00002.safetensors" for k in shard1},
            **{k: "model-00002-of-00002.safetensors" for k in shard2},
        },
    }
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(
        json.dumps({"id2label": {str(i): c for i, c in enumerate("vwxyz")}})
    )
    (src / "tokenizer.json").write_text("{}")
    ckpt = open_checkpoint(src / "model.safetensors.index.json")
    assert ckpt.labels() == list("vwxyz")
    w = torch.cat([ckpt.tensor("fc.weight"), torch.ones(1, 8)])
    b = torch.cat([ckpt.tensor("fc.bias"), torch.ones(1)])
    ckpt.write(tmp_path / "out", {"fc.weight": w, "fc.bias": b}, list("vwxyzq"))
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == (
        src / "model-00001-of-00002.safetensors"
    ).read_bytes()
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["metadata"]["total_size"] == total + 9 * 4
    assert json.loads((out / "config.json").read_text())["label2id"]["q"] == 5
    assert torch.equal(load_file(out / "model-00002-of-00002.safetensors")["fc.weight"], w)
    assert open_checkpoint(out / "model.safetensors.index.json").labels() == list("vwxyzq")


def test_missing_shard_and_unknown_format_are_input_errors(tmp_path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fc.weight": "model-00001-of-00001.safetensors"}})
    )
    with pytest.raises(InputError, match="missing"):
        open_checkpoint(tmp_path / "model.safetensors.index.json")
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(InputError, match="cannot tell the format"):
        open_checkpoint(tmp_path / "weights.h5")
    with pytest.raises(InputError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_a_training_checkpoint_keeps_its_optimizer_in_step(tmp_path) -> None:
    """A .pt holding model, optimizer and epoch (the yolov5 case): grafting the bare file grows
    the optimizer's moments too, so training resumes from the file alone."""
    from headgraft.io.sources import add_labels, load_model, save_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 6)).logsumexp(1).mean().backward()
        opt.step()
    path = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, path)
    loaded = load_model(str(path))
    add_labels(loaded, ["fox"], seed=0)
    save_model(loaded, str(tmp_path / "grown.pt"))
    saved = torch.load(tmp_path / "grown.pt", weights_only=True)
    assert saved["epoch"] == 3 and saved["model"]["2.weight"].shape == (4, 8)
    state = saved["optimizer"]["state"]
    old = opt.state_dict()["state"]
    assert (
        torch.equal(state[2]["exp_avg"][:3], old[2]["exp_avg"]) and not state[2]["exp_avg"][3].any()
    )
    assert torch.equal(state[3]["exp_avg_sq"][:3], old[3]["exp_avg_sq"])
    assert torch.equal(state[0]["exp_avg"], old[0]["exp_avg"])
    grown = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    grown.load_state_dict(saved["model"])
    resumed = torch.optim.Adam(grown.parameters())
    resumed.load_state_dict(saved["optimizer"])
    grown(torch.randn(4, 6)).sum().backward()
    resumed.step()  # shapes fit: the step runs
