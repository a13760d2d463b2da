"""Model sources: load a model (or just its head) from what users have on disk, and save it back.

Three kinds of source, one loader for every command:

* ``hf``: a Hugging Face folder (``config.json`` + weights), loaded with the
  ``AutoModelFor...Classification`` class its ``architectures`` name, saved with
  ``save_pretrained`` (``id2label``/``label2id`` grown, so ``from_pretrained`` needs no
  ``ignore_mismatched_sizes``);
* ``arch``: an architecture (``timm:NAME``, ``torchvision:NAME`` or ``package.module:factory``)
  plus a weights file; saved as a safetensors state dict with the labels in its metadata;
* ``checkpoint``: a bare weights file, grafted without building the model: only the head's
  tensors are read, and safetensors files are rewritten by streaming.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HeadgraftError, InputError
from ..graft import add_classes, full_rows, fuse, remove_classes
from ..heads import Head, find_head, get_module, set_module, with_rows
from ..labels import LabelMap, model_labels, set_model_labels
from ..registry import Registry
from .atomic import atomic_dir, atomic_path, check_output
from .checkpoint import (
    LABELS_KEY,
    TORCH_LABELS_KEY,
    TORCH_SUFFIXES,
    Checkpoint,
    HeadTensors,
    find_head_tensors,
    head_model,
    open_checkpoint,
)


@dataclass
class Loaded:
    """A model source opened for grafting.

    Attributes:
        model: the model (None for a bare checkpoint, whose head alone is in ``head_model``).
        kind: ``hf``, ``arch`` or ``checkpoint``.
        source: the path given (the weights file for ``arch``).
        tokenizer: the Hugging Face tokenizer of a model folder, else None.
        processor: the Hugging Face image processor of a model folder, else None.
        head: the head path(s) to pass to ``find_head`` on ``target``.
        arch: the ``--arch`` spec, for ``arch`` sources.
        checkpoint: the opened weights file, for ``checkpoint`` sources.
        head_tensors: where the head lives in that file.
        head_model: the checkpoint's head as a small module (what is grafted).
        original: head rows as loaded, per head path (to verify the output against).
        row_map: after grafting, the original row of every current row (None: a new row).
        max_shard_size: the largest input shard of a sharded Hugging Face folder, in bytes.
        trust_pickle: whether pickled objects were allowed when loading (and re-opening).
    """

    model: nn.Module | None
    kind: str
    source: str
    tokenizer: Any = None
    processor: Any = None
    head: str | None = None
    arch: str | None = None
    checkpoint: Checkpoint | None = None
    head_tensors: list[HeadTensors] = field(default_factory=list)
    head_model: nn.Module | None = None
    original: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    row_map: list[int | None] | None = None
    max_shard_size: int | None = None
    trust_pickle: bool = False

    @property
    def target(self) -> nn.Module:
        """What grafting changes: the model, or the checkpoint's head module."""
        target = self.model if self.model is not None else self.head_model
        assert target is not None
        return target

    def set_target(self, module: nn.Module) -> None:
        """Store the grafted module (``add_classes`` returns a new one when it is the head)."""
        if self.model is not None:
            self.model = module
        else:
            self.head_model = module

    @property
    def labels(self) -> LabelMap:
        """The current label names, one per head row."""
        return model_labels(self.target, self.head)

    def find_head(self) -> Head:
        return find_head(self.target, self.head)

    def require_model(self, what: str) -> nn.Module:
        """The full model; a bare checkpoint gets an error saying how to provide one."""
        if self.model is None:
            raise InputError(
                f"{what} needs the whole model, but {self.source} is a bare "
                "checkpoint; pass --arch (timm:NAME, torchvision:NAME or "
                "package.module:factory) with --weights, or a Hugging Face folder"
            )
        return self.model

    def _snapshot(self) -> None:
        h = self.find_head()
        self.original = {}
        for path in h.paths:
            w, b = full_rows(get_module(self.target, path))
            self.original[path] = (w.clone(), None if b is None else b.clone())


# ----------------------------------------------------------------------------- architectures

Builder = Callable[[str, "int | None"], nn.Module]
ARCHES: Registry[Builder] = Registry("architecture family")


@ARCHES.register("timm", "timm:NAME, built with timm.create_model(NAME, pretrained=False)")
def _build_timm(name: str, num_classes: int | None) -> nn.Module:
    try:
        import timm
    except ModuleNotFoundError:
        raise HeadgraftError(
            "--arch timm:... needs timm; pip install 'headgraft[vision]'"
        ) from None
    if not timm.is_model(name):
        raise InputError(
            f"unknown timm model {name!r}; list them with timm.list_models('*{name[:6]}*')"
        )
    kw = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=False, **kw)


@ARCHES.register("torchvision", "torchvision:NAME, built with torchvision.models.get_model")
def _build_torchvision(name: str, num_classes: int | None) -> nn.Module:
    try:
        from torchvision import models
    except ModuleNotFoundError:
        raise HeadgraftError(
            "--arch torchvision:... needs torchvision; pip install 'headgraft[vision]'"
        ) from None
    try:
        builder = models.get_model_builder(name)
    except ValueError:
        raise InputError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models()"
        ) from None
    kw: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    return builder(**kw)


def _build_factory(spec: str, num_classes: int | None) -> nn.Module:
    """``package.module:factory``: the user's own code, called with ``num_classes`` if it
    takes one. The current folder is importable, as it is for ``python -m``."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name != mod_name.split(".")[0] or os.getcwd() in sys.path:
            raise InputError(
                f"cannot import {mod_name!r} for --arch ({e}); install it or add "
                "its folder to PYTHONPATH"
            ) from None
        sys.path.insert(0, os.getcwd())
        return _build_factory(spec, num_classes)
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise InputError(
            f"{mod_name} has no callable {fn_name!r}; --arch takes package.module:factory"
        )
    params = inspect.signature(factory).parameters
    model = (
        factory(num_classes=num_classes)
        if num_classes is not None and "num_classes" in params
        else factory()
    )
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def build_arch(arch: str, num_classes: int | None = None) -> nn.Module:
    """Build an untrained model from an ``--arch`` spec."""
    family, sep, name = arch.partition(":")
    if sep and family in ARCHES:
        return ARCHES.get(family)(name, num_classes)
    if sep and name.isidentifier() and all(p.isidentifier() for p in family.split(".")):
        return _build_factory(arch, num_classes)
    raise InputError(
        f"cannot read --arch {arch!r}; use one of: "
        + ", ".join(f"{f}:NAME" for f in ARCHES)
        + ", package.module:factory"
    )


# ----------------------------------------------------------------------------- Hugging Face

HF_TASKS: Registry[str] = Registry("transformers task")
for _suffix, _auto in (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForAudioClassification", "AutoModelForAudioClassification"),
    ("ForVideoClassification", "AutoModelForVideoClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
):
    HF_TASKS.register(_suffix, f"architectures ending in {_suffix}, loaded with {_auto}")(_auto)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file} is not readable JSON ({e}); fix or re-create it") from None
    if not isinstance(data, dict):
        raise InputError(f"{file} is not a JSON object; fix or re-create it")
    return data


def _load_hf(folder: Path, head: str | None) -> Loaded:
    cfg = _read_json(folder / "config.json")
    archs = [str(a) for a in cfg.get("architectures") or []]
    auto = next((HF_TASKS.get(s) for a in archs for s in HF_TASKS if a.endswith(s)), None)
    if auto is None:
        what = ", ".join(archs) or cfg.get("model_type", "unknown")
        raise InputError(
            f"{folder} holds a {what} model without a classification head; give it one first, "
            "e.g. AutoModelForSequenceClassification.from_pretrained(folder, num_labels=N)"
            ".save_pretrained(out)"
        )
    import transformers

    try:
        model = getattr(transformers, auto).from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise InputError(
            f"cannot load {folder} with {auto} ({str(e).strip().splitlines()[0]}); "
            "check that the folder holds a complete model"
        ) from None
    model.eval()
    tokenizer = processor = None
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if (folder / "preprocessor_config.json").is_file():
        processor = transformers.AutoImageProcessor.from_pretrained(
            str(folder), local_files_only=True
        )
    shard = None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_read_json(index).get("weight_map", {}).values())
        shard = max(
            ((folder / s).stat().st_size for s in shards if (folder / s).is_file()), default=None
        )
    return Loaded(
        model=model,
        kind="hf",
        source=str(folder),
        tokenizer=tokenizer,
        processor=processor,
        head=head,
        max_shard_size=shard,
    )


# ----------------------------------------------------------------------------- loading


def _float_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _mismatch(model: nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
    return "; ".join(parts) or None


def _load_arch(arch: str, weights: str, head: str | None, trust_pickle: bool) -> Loaded:
    ckpt = open_checkpoint(weights, trust_pickle=trust_pickle)
    labels = ckpt.labels()
    hint = len(labels) if labels else None
    if hint is None:
        try:
            hint = find_head_tensors({n: ckpt.shape(n) for n in ckpt.names()})[0].num_classes
        except InputError:
            hint = None
    model = build_arch(arch, hint)
    sd = ckpt.state_dict()
    dtype = _float_dtype(sd)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)  # keep the checkpoint's dtype, the head's included
    h = find_head(model, head)
    for path in h.paths:  # a head of another size than the default: resize it to the file
        module = get_module(model, path)
        w, b = sd.get(f"{path}.weight"), sd.get(f"{path}.bias")
        if (
            w is not None
            and w.shape != module.weight.shape
            and w.shape[1:] == module.weight.shape[1:]
            and (b is None) == (getattr(module, "bias", None) is None)
        ):
            set_module(
                model,
                path,
                with_rows(module, w.detach().clone(), None if b is None else b.detach().clone()),
            )
    problem = _mismatch(model, sd)
    if problem:
        raise InputError(
            f"the weights {weights} do not fit --arch {arch} ({problem}); check "
            "that --arch names the architecture the weights were trained with"
        )
    model.load_state_dict(sd, strict=True)
    model.eval()
    n = find_head(model, head).num_classes
    set_model_labels(
        model, LabelMap(labels) if labels and len(labels) == n else model_labels(model, head)
    )
    return Loaded(model=model, kind="arch", source=str(weights), head=head, arch=arch)


def _load_checkpoint(path: str, head: str | None, trust_pickle: bool) -> Loaded:
    ckpt = open_checkpoint(path, trust_pickle=trust_pickle)
    labels = ckpt.labels()
    shapes = {n: ckpt.shape(n) for n in ckpt.names()}
    heads = find_head_tensors(shapes, head, len(labels) if labels and head is None else None)
    module, head_path = head_model(ckpt, heads, labels)
    return Loaded(
        model=None,
        kind="checkpoint",
        source=str(path),
        head=head_path,
        checkpoint=ckpt,
        head_tensors=heads,
        head_model=module,
    )


def load_model(
    source: str | None,
    *,
    arch: str | None = None,
    weights: str | None = None,
    head: str | None = None,
    trust_pickle: bool = False,
) -> Loaded:
    """Open a model source for grafting.

    Args:
        source: a Hugging Face folder, or a weights file (``.safetensors``,
            ``model.safetensors.index.json``, ``.pt/.pth/.bin/.ckpt``); with ``arch`` it may
            be the weights file instead of ``weights``.
        arch: ``timm:NAME``, ``torchvision:NAME`` or ``package.module:factory``.
        weights: the weights file for ``arch``.
        head: the head's module path (or tensor prefix in a bare checkpoint), when it cannot
            be found automatically.
        trust_pickle: allow pickled objects that ``torch.load(weights_only=True)`` refuses.

    Raises:
        InputError: missing or unreadable files, weights that do not fit ``arch``, a folder
            without a classification model, no or several head candidates.
        UnsafeFileError: a pickle that needs ``trust_pickle``.
    """
    if arch is not None:
        if weights is not None and source is not None and Path(source) != Path(weights):
            raise InputError("give the weights once: MODEL or --weights, not both")
        weights = weights or source
        if weights is None:
            raise InputError(f"--arch {arch} needs the trained weights: --weights FILE")
        _exists(weights)
        loaded = _load_arch(arch, weights, head, trust_pickle)
    else:
        if weights is not None:
            raise InputError(
                "--weights needs --arch (timm:NAME, torchvision:NAME or "
                "package.module:factory) to build the model"
            )
        if source is None:
            raise InputError(
                "no model given; pass a Hugging Face folder, a weights file, or "
                "--arch with --weights"
            )
        p = _exists(source)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise InputError(
                    f"{p} is a folder without config.json, so not a Hugging Face "
                    "model; pass a weights file, or --arch with --weights"
                )
            loaded = _load_hf(p, head)
        else:
            loaded = _load_checkpoint(source, head, trust_pickle)
    loaded.trust_pickle = trust_pickle
    loaded._snapshot()
    return loaded


def _exists(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path} does not exist; check the path")
    return p


# ----------------------------------------------------------------------------- grafting


def _compose(loaded: Loaded, step: Sequence[int | None]) -> None:
    prev = loaded.row_map
    loaded.row_map = [None if r is None else (r if prev is None else prev[r]) for r in step]


def add_labels(loaded: Loaded, new_labels: Sequence[str], **kwargs: Any) -> None:
    """``headgraft.add_classes`` on the source's model or head, keeping ``row_map`` in step."""
    n = loaded.find_head().num_classes
    loaded.set_target(add_classes(loaded.target, new_labels, head=loaded.head, **kwargs))
    m = loaded.find_head().num_classes
    _compose(loaded, [*range(n), *([None] * (m - n))])


def remove_labels(loaded: Loaded, labels: Sequence[str]) -> None:
    """``headgraft.remove_classes`` on the source's model or head, keeping ``row_map`` in step."""
    _, keep = loaded.labels.remove(labels)
    loaded.set_target(remove_classes(loaded.target, labels, head=loaded.head))
    _compose(loaded, keep)


# ----------------------------------------------------------------------------- saving


def _dedupe_shared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage (tied weights): safetensors refuses shared memory."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        out[k] = v.clone().contiguous() if key in seen else v.contiguous()
        seen.add(key)
    return out


def write_state_dict(
    sd: dict[str, torch.Tensor],
    out: str | os.PathLike[str],
    labels: Sequence[str],
    *,
    force: bool = False,
) -> None:
    """Write a state dict with its label names, atomically: safetensors (labels in the
    metadata) or, for ``.pt/.pth/.bin``, ``torch.save`` (labels in ``_metadata``)."""
    suffix = Path(out).suffix
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt", LABELS_KEY: json.dumps(list(labels))}
        with atomic_path(out, force=force) as tmp:
            save_file(_dedupe_shared(sd), str(tmp), metadata=meta)
    elif suffix in TORCH_SUFFIXES:
        od: OrderedDict[str, torch.Tensor] = OrderedDict(sd)
        meta = {k: dict(v) for k, v in (getattr(sd, "_metadata", None) or {}).items()}
        meta.setdefault("", {})[TORCH_LABELS_KEY] = list(labels)
        od._metadata = meta  # type: ignore[attr-defined]
        with atomic_path(out, force=force) as tmp:
            torch.save(od, tmp)
    else:
        raise InputError(
            f"cannot tell the output format from {out}; name it *.safetensors (or .pt/.pth)"
        )


def _save_hf(loaded: Loaded, out: str, force: bool) -> None:
    model = loaded.require_model("saving a Hugging Face folder")
    with atomic_dir(out, force=force) as tmp:
        kw = {} if loaded.max_shard_size is None else {"max_shard_size": loaded.max_shard_size}
        model.save_pretrained(str(tmp), **kw)
        for extra in (loaded.tokenizer, loaded.processor):
            if extra is not None:
                extra.save_pretrained(str(tmp))


def _save_arch(loaded: Loaded, out: str, force: bool) -> None:
    model = loaded.require_model("saving --arch weights")
    write_state_dict(model.state_dict(), out, loaded.labels.names, force=force)


def _save_checkpoint(loaded: Loaded, out: str, force: bool) -> None:
    ckpt = loaded.checkpoint
    assert ckpt is not None
    replace: dict[str, torch.Tensor] = {}
    for h in loaded.head_tensors:
        w, b = full_rows(get_module(loaded.target, h.prefix))
        replace[h.weight] = w
        if h.bias is not None:
            assert b is not None
            replace[h.bias] = b
    ckpt.write(out, replace, loaded.labels.names, force=force, row_map=loaded.row_map)


SAVERS: dict[str, Callable[[Loaded, str, bool], None]] = {
    "hf": _save_hf,
    "arch": _save_arch,
    "checkpoint": _save_checkpoint,
}


def check_output_name(loaded: Loaded, out: str) -> None:
    """Refuse an output name whose format differs from what the source is written as."""
    suffix = Path(out).suffix
    if loaded.kind == "hf" or (loaded.checkpoint is not None and loaded.checkpoint.output_is_dir):
        if suffix in (".safetensors", *TORCH_SUFFIXES, ".json"):
            raise InputError(
                f"{loaded.source} is written as a folder; give -o a folder name, not {out}"
            )
    elif loaded.kind == "checkpoint":
        fmt = loaded.checkpoint.format if loaded.checkpoint else ""
        ok = (suffix == ".safetensors") if fmt == "safetensors" else suffix in TORCH_SUFFIXES
        if not ok:
            want = ".safetensors" if fmt == "safetensors" else "/".join(TORCH_SUFFIXES)
            raise InputError(
                f"{loaded.source} is a {fmt} file and is written in its own format; "
                f"name the output *{want}"
            )
    elif suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise InputError(f"name the output *.safetensors (or .pt/.pth), not {out}")


def save_model(loaded: Loaded, out: str, *, force: bool = False) -> None:
    """Write the (grafted) source in its own format, atomically.

    Split heads are fused first. The input is never overwritten; an existing ``out`` only
    with ``force``.
    """
    check_output(out, [loaded.source], force=force)
    check_output_name(loaded, out)
    loaded.set_target(fuse(loaded.target, head=loaded.head))
    try:
        SAVERS[loaded.kind](loaded, out, force)
    except OSError as e:
        raise HeadgraftError(
            f"writing {out} failed ({e.strerror or e}); nothing was written "
            "and the input is unchanged"
        ) from None


# ----------------------------------------------------------------------------- verifying


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _same_rows(new: torch.Tensor, old: torch.Tensor, row_map: Sequence[int | None]) -> bool:
    if new.shape[0] != len(row_map) or new.shape[1:] != old.shape[1:] or new.dtype != old.dtype:
        return False
    dst = [i for i, r in enumerate(row_map) if r is not None]
    src = [r for r in row_map if r is not None]
    return torch.equal(_bits(new[dst]), _bits(old[src]))


def read_labels(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> list[str] | None:
    """The label names saved with an output (a folder's ``config.json``, else the weights)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        id2label = _read_json(p / "config.json").get("id2label")
        if isinstance(id2label, dict) and id2label:
            return LabelMap.from_id2label(id2label).names
    return open_checkpoint(p, trust_pickle=trust_pickle).labels()


def verify_output(loaded: Loaded, out: str) -> dict[str, Any]:
    """Re-open ``out`` and check that every original row is there, bit-identical, and that
    the labels were saved; on failure the output is removed and an error raised."""
    written = open_checkpoint(out, trust_pickle=loaded.trust_pickle)
    row_map = loaded.row_map or list(range(next(iter(loaded.original.values()))[0].shape[0]))
    names: dict[str, tuple[str, str | None]] = {}
    if loaded.kind == "checkpoint":
        for h in loaded.head_tensors:
            names[h.prefix] = (h.weight, h.bias)
    else:
        for path in loaded.original:
            names[path] = (f"{path}.weight", f"{path}.bias")
    problems = []
    kept = sum(r is not None for r in row_map)
    for path, (w0, b0) in loaded.original.items():
        wn, bn = names[path]
        if wn not in written.names():
            problems.append(f"{wn} is missing")
            continue
        if not _same_rows(written.tensor(wn), w0, row_map):
            problems.append(f"{wn} old rows differ")
        if b0 is not None and (
            bn not in written.names() or not _same_rows(written.tensor(bn), b0, row_map)
        ):
            problems.append(f"{bn} old rows differ")
    labels = read_labels(out, trust_pickle=loaded.trust_pickle)
    if labels != loaded.labels.names:
        problems.append(f"saved labels {labels!r} are not {loaded.labels.names!r}")
    if problems:
        import shutil

        if Path(out).is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            Path(out).unlink(missing_ok=True)
        raise HeadgraftError(
            f"verification of {out} failed ({'; '.join(problems)}); the "
            "output was removed, please report this as a bug"
        )
    return {"rows_verified": kept, "heads": list(loaded.original), "labels": labels}
