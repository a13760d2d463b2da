"""Serving: write a (grown) classifier as ONNX or TorchScript, with its label names inside.

The exported graph takes what the model takes (token ids and attention mask for a Hugging
Face text model, an image tensor for timm/torchvision, a feature vector for a bare head) and
returns the logits only. Label names (and multi-label thresholds) travel with the file: in
ONNX ``metadata_props`` and in TorchScript ``extra_files``, so a server never needs a second
file to name its outputs. ``check_onnx`` runs ONNX Runtime and compares with PyTorch.

Both registries here are open: ``EXPORT_INPUTS`` says how to make example inputs for a model
family, ``EXPORT_FORMATS`` how to write a format.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HeadgraftError, InputError
from ..features import logits_of
from ..heads import find_head
from ..labels import LabelMap, model_labels
from ..registry import Registry
from .atomic import atomic_path

LABELS_KEY = "headgraft_labels"
ID2LABEL_KEY = "id2label"
PROBLEM_TYPE_KEY = "problem_type"
DEFAULT_OPSET = 18


# ----------------------------------------------------------------------------- example inputs


@dataclass
class ExportInputs:
    """Named example inputs of the exported graph and which of their axes are dynamic."""

    names: tuple[str, ...]
    example: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    text: bool = False  # keyword inputs of a Hugging Face model

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.example))


InputMaker = Callable[[nn.Module, Any, "tuple[int, ...] | None"], "ExportInputs | None"]
EXPORT_INPUTS: Registry[InputMaker] = Registry("export input maker")


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters(), None)
    return (torch.float32, torch.device("cpu")) if p is None else (p.dtype, p.device)


def _image(model: nn.Module, shape: Sequence[int]) -> ExportInputs:
    dtype, device = _dtype_device(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=g).to(device=device, dtype=dtype)
    return ExportInputs(("pixel_values",), (x,), {"pixel_values": {0: "batch"}})


@EXPORT_INPUTS.register(
    "transformers",
    "Hugging Face text models: input_ids, attention_mask"
    " (and token_type_ids when the tokenizer makes them)",
)
def _text_inputs(
    model: nn.Module, tokenizer: Any, shape: tuple[int, ...] | None
) -> ExportInputs | None:
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "vocab_size", None):
        return None
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        return None
    names = ["input_ids", "attention_mask"]
    if tokenizer is not None:
        if "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
            names.append("token_type_ids")
    elif "token_type_ids" in params and getattr(config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    seq = int(shape[-1]) if shape else 8
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(int(config.vocab_size), 1000), (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq // 2 :] = 0  # a padded row, so padding stays dynamic in the graph
    example = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros(2, seq, dtype=torch.long),
    }
    device = _dtype_device(model)[1]
    return ExportInputs(
        tuple(names),
        tuple(example[n].to(device) for n in names),
        {n: {0: "batch", 1: "sequence"} for n in names},
        text=True,
    )


@EXPORT_INPUTS.register("shape", "an explicit input shape (--input-shape C,H,W or D)")
def _shape_inputs(
    model: nn.Module, _tok: Any, shape: tuple[int, ...] | None
) -> ExportInputs | None:
    if not shape:
        return None
    if len(shape) == 1:
        dtype, device = _dtype_device(model)
        x = torch.randn(2, shape[0], generator=torch.Generator().manual_seed(0))
        return ExportInputs(
            ("features",), (x.to(device=device, dtype=dtype),), {"features": {0: "batch"}}
        )
    return _image(model, shape)


@EXPORT_INPUTS.register("timm", "timm models: pretrained_cfg['input_size']")
def _timm_inputs(
    model: nn.Module, _tok: Any, _shape: tuple[int, ...] | None
) -> ExportInputs | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not cfg.get("input_size"):
        return None
    return _image(model, tuple(cfg["input_size"]))


_TORCHVISION_SIZES = {"Inception3": 299}


@EXPORT_INPUTS.register("torchvision", "torchvision models: 3x224x224 (299 for Inception3)")
def _torchvision_inputs(
    model: nn.Module, _tok: Any, _shape: tuple[int, ...] | None
) -> ExportInputs | None:
    if not type(model).__module__.startswith("torchvision.models"):
        return None
    size = _TORCHVISION_SIZES.get(type(model).__name__, 224)
    return _image(model, (3, size, size))


@EXPORT_INPUTS.register(
    "first-layer",
    "other models: the first Linear's in_features, or a first Conv2d's channels at 224x224",
)
def _first_layer_inputs(
    model: nn.Module, _tok: Any, _shape: tuple[int, ...] | None
) -> ExportInputs | None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return _shape_inputs(model, None, (m.in_features,))
        if isinstance(m, nn.Conv2d):
            return _image(model, (m.in_channels, 224, 224))
    return None


def example_inputs(
    model: nn.Module, *, tokenizer: Any = None, input_shape: Sequence[int] | None = None
) -> ExportInputs:
    """Example inputs for exporting ``model``, from the first maker in ``EXPORT_INPUTS``
    that recognises it (an explicit ``input_shape`` wins over the model-family guesses)."""
    shape = tuple(int(s) for s in input_shape) if input_shape else None
    for name in EXPORT_INPUTS:
        if name == "shape" and shape is None:
            continue
        made = EXPORT_INPUTS.get(name)(model, tokenizer, shape)
        if made is not None:
            return made
    raise InputError(
        f"cannot tell what {type(model).__name__} takes as input; pass "
        "input_shape (CLI: --input-shape 3,224,224 for images, or D for features)"
    )


# ----------------------------------------------------------------------------- wrappers


class _TensorLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


class _TextLogits(nn.Module):
    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return logits_of(self.model(**kw))


def logits_module(model: nn.Module, inputs: ExportInputs) -> nn.Module:
    """``model`` wrapped to take positional tensors and return only the logits."""
    return _TextLogits(model, inputs.names) if inputs.text else _TensorLogits(model)


# ----------------------------------------------------------------------------- metadata


def export_metadata(
    model: nn.Module, labels: Sequence[str] | None = None, head: str | None = None
) -> dict[str, str]:
    """What travels inside the exported file: label names, ``id2label``, thresholds."""
    from .. import __version__
    from ..multilabel import PROBLEM_TYPE, is_multilabel, thresholds, to_metadata

    names = LabelMap(labels) if labels is not None else model_labels(model, head)
    n = find_head(model, head).num_classes
    if len(names) != n:
        raise InputError(
            f"{len(names)} label names for a head with {n} outputs; give one name per output"
        )
    meta = {
        LABELS_KEY: json.dumps(names.names),
        ID2LABEL_KEY: json.dumps({str(k): v for k, v in names.id2label.items()}),
        "headgraft_version": __version__,
        PROBLEM_TYPE_KEY: "single_label_classification",
    }
    if is_multilabel(model):
        meta[PROBLEM_TYPE_KEY] = PROBLEM_TYPE
        meta.update(to_metadata(names.names, thresholds(model, head=head)))
    return meta


# ----------------------------------------------------------------------------- formats

Exporter = Callable[[nn.Module, ExportInputs, Path, dict[str, str], dict[str, Any]], None]
EXPORT_FORMATS: Registry[Exporter] = Registry("export format")


def _dims(inputs: ExportInputs) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes, one per positional input; equal names share a Dim."""
    shared: dict[str, Any] = {}
    return tuple(
        {
            axis: shared.setdefault(dim, torch.export.Dim(dim))
            for axis, dim in inputs.dynamic.get(n, {}).items()
        }
        for n in inputs.names
    )


@EXPORT_FORMATS.register(
    "onnx", "ONNX (torch.onnx.export, dynamo exporter by default; labels in metadata_props)"
)
def _export_onnx(
    wrapper: nn.Module,
    inputs: ExportInputs,
    out: Path,
    meta: dict[str, str],
    options: dict[str, Any],
) -> None:
    import onnx

    dynamo = bool(options.get("dynamo", True))
    opset = int(options.get("opset", DEFAULT_OPSET))
    kwargs: dict[str, Any] = {
        "input_names": list(inputs.names),
        "output_names": ["logits"],
        "opset_version": opset,
        "dynamo": dynamo,
    }
    if dynamo:
        kwargs["dynamic_shapes"] = _dims(inputs)
        kwargs["verbose"] = False
    else:
        kwargs["dynamic_axes"] = {**inputs.dynamic, "logits": {0: "batch"}}
    chatter = io.StringIO()  # the exporter's progress lines; shown only if it fails
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(chatter),
            contextlib.redirect_stderr(chatter),
        ):
            warnings.simplefilter("ignore")  # tracer and deprecation notes, not the user's
            torch.onnx.export(wrapper, inputs.example, str(out), **kwargs)
    except Exception:
        sys.stderr.write(chatter.getvalue())
        raise
    proto = onnx.load(str(out))
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in meta.items():
        entry = existing.get(k) or proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(out))


@EXPORT_FORMATS.register(
    "torchscript", "TorchScript (torch.jit.trace; labels in the archive's extra files)"
)
def _export_torchscript(
    wrapper: nn.Module,
    inputs: ExportInputs,
    out: Path,
    meta: dict[str, str],
    options: dict[str, Any],
) -> None:  # noqa: ARG001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still serves
        traced = torch.jit.trace(wrapper, inputs.example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"headgraft.json": json.dumps(meta)})


# ----------------------------------------------------------------------------- API


@dataclass
class ExportResult:
    """Where the model went and how it was checked."""

    path: Path
    format: str
    inputs: list[str]
    labels: list[str]
    metadata: dict[str, str]
    max_abs_diff: float | None = None
    argmax_agree: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def export(
    model: nn.Module,
    out: str | os.PathLike[str],
    format: str = "onnx",
    *,
    tokenizer: Any = None,
    input_shape: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    head: str | None = None,
    force: bool = False,
    check: bool = True,
    options: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write ``model`` in ``format`` to ``out`` (atomically), with its labels inside.

    Args:
        model: the classifier (any nn.Module whose output holds the logits).
        out: the output file; an existing one is refused unless ``force``.
        format: a name from ``EXPORT_FORMATS`` (``onnx``, ``torchscript``).
        tokenizer: a Hugging Face tokenizer, to name the text inputs it produces.
        input_shape: shape of one example without the batch axis, when the model family
            gives no hint (``(3, 224, 224)``, or ``(d,)`` for features).
        labels: label names; read from the model when omitted.
        head: dotted path of the head; found automatically when omitted.
        force: overwrite an existing output.
        check: re-open the file and compare its outputs with PyTorch on the example inputs.
        options: format settings: ``dynamo`` (bool) and ``opset`` (int) for ONNX.

    Returns:
        An :class:`ExportResult`; with ``check`` its ``max_abs_diff`` and ``argmax_agree``.
    """
    writer = EXPORT_FORMATS.get(format)
    target = Path(out)
    meta = export_metadata(model, labels, head)
    inputs = example_inputs(model, tokenizer=tokenizer, input_shape=input_shape)
    was = model.training
    model.eval()
    wrapper = logits_module(model, inputs).eval()
    try:
        with atomic_path(target, force=force) as tmp:
            try:
                writer(wrapper, inputs, tmp, meta, dict(options or {}))
            except HeadgraftError:
                raise
            except Exception as e:  # noqa: BLE001 - the exporter's own error, with a way out
                raise HeadgraftError(
                    f"{format} export of {type(model).__name__} failed: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; try "
                    "--no-dynamo (ONNX) or the other format"
                ) from e
            result = ExportResult(
                tmp, format, list(inputs.names), json.loads(meta[LABELS_KEY]), meta
            )
            if check:
                with torch.no_grad():
                    ref = wrapper(*inputs.example).float().cpu()
                got = run_exported(tmp, format, inputs.as_dict())
                result.max_abs_diff = float((got - ref).abs().max())
                result.argmax_agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    finally:
        model.train(was)
    result.path = target
    return result


def run_exported(
    path: str | os.PathLike[str], format: str, inputs: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Logits of an exported file on named inputs (ONNX Runtime on CPU, or TorchScript)."""
    EXPORT_FORMATS.get(format)
    if format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        feed = {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in wanted}
        return torch.from_numpy(session.run(["logits"], feed)[0]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(*[v.cpu() for v in inputs.values()]).float()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The headgraft metadata of an exported ONNX or TorchScript file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} does not exist; check the path")
    if p.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(p), load_external_data=False)
        return {e.key: e.value for e in proto.metadata_props}
    extra = {"headgraft.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    return json.loads(extra["headgraft.json"] or "{}")


def exported_labels(path: str | os.PathLike[str]) -> LabelMap:
    """The label names stored in an exported file."""
    meta = read_metadata(path)
    if LABELS_KEY not in meta:
        raise InputError(f"{path} carries no headgraft labels; export it with headgraft export")
    return LabelMap(json.loads(meta[LABELS_KEY]))
