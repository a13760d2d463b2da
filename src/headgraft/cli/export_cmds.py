"""`headgraft export`: write a (grown) model for serving, with its labels inside the file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import InputError
from ..io.export import EXPORT_FORMATS
from ._app import app, console, console_err, print_json
from .graft_cmds import (
    EXIT_CODES,
    ArchOpt,
    ForceOpt,
    HeadOpt,
    JsonOpt,
    ModelArg,
    PickleOpt,
    WeightsOpt,
    _command,
    _load,
)


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise InputError(
            f"--input-shape {text!r} is not a list of positive sizes; e.g. 3,224,224 for "
            "images or 384 for feature vectors"
        )
    return shape


def _carry_thresholds(loaded) -> None:
    """A bare safetensors head keeps multi-label thresholds in its metadata (beside the
    labels); put them on the head module so that the export carries them too."""
    from ..multilabel import from_metadata, mark_multilabel

    header = getattr(loaded.checkpoint, "header", None)
    stored = from_metadata(getattr(header, "metadata", None))
    if stored:
        known = set(loaded.labels)
        mark_multilabel(loaded.target, {k: v for k, v in stored.items() if k in known})


@app.command(epilog=EXIT_CODES)
def export(
    model: str | None = ModelArg,
    out: str = typer.Option(..., "--out", "-o", help="The file to write (.onnx or .pt)."),
    format: str = typer.Option(  # noqa: A002 - the word users type
        "onnx",
        "--format",
        "-f",
        help=f"Output format: {', '.join(EXPORT_FORMATS.names())}.",
    ),
    input_shape: str | None = typer.Option(
        None,
        "--input-shape",
        help="One example's shape without the batch axis, when the model family gives no "
        "hint: 3,224,224 for images, 384 for a head over features.",
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset version."),
    dynamo: bool = typer.Option(
        True,
        "--dynamo/--no-dynamo",
        help="ONNX: the torch.export-based exporter (default) or the legacy TorchScript one.",
    ),
    check: bool = typer.Option(
        True,
        "--check/--no-check",
        help="Run the written file (ONNX Runtime / TorchScript) and compare with PyTorch.",
    ),
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    head: str | None = HeadOpt,
    trust_pickle: bool = PickleOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Export MODEL as ONNX or TorchScript; label names (and multi-label thresholds) go
    inside the file (ONNX metadata_props, TorchScript extra files).

    The graph takes what the model takes (input_ids/attention_mask for a Hugging Face text
    model, an image batch for timm/torchvision, features for a bare head) and returns logits.

    Examples:
      headgraft export grown/ -o model.onnx
      headgraft export grown/ --format torchscript -o model.pt
      headgraft export head.safetensors --input-shape 384 -o head.onnx
    """
    from ..io.export import export as export_model

    EXPORT_FORMATS.get(format)
    shape = _shape(input_shape)
    with _command():
        loaded = _load(model, arch, weights, head, trust_pickle)
        if Path(out).resolve() == Path(loaded.source).resolve():
            raise InputError(f"--out {out} is the input; choose another output file")
        _carry_thresholds(loaded)
        target = loaded.target
        result = export_model(
            target,
            out,
            format,
            tokenizer=loaded.tokenizer,
            input_shape=shape,
            head=loaded.head,
            force=force,
            check=check,
            options={"opset": opset, "dynamo": dynamo},
        )
    if result.argmax_agree is not None and result.argmax_agree < 1.0:
        console_err.print(
            f"warning: the exported file and PyTorch disagree on {1 - result.argmax_agree:.0%} "
            f"of the check inputs (max |logit diff| {result.max_abs_diff:.1e}); try "
            "--no-dynamo or another --opset",
            highlight=False,
            markup=False,
        )
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(title=f"exported {loaded.source} as {format}", show_header=False)
    table.add_row("file", str(result.path))
    table.add_row("inputs", ", ".join(result.inputs))
    table.add_row("labels", ", ".join(result.labels[:30]))
    if result.max_abs_diff is not None:
        table.add_row("max |logit diff|", f"{result.max_abs_diff:.2e}")
        table.add_row("argmax agreement", f"{result.argmax_agree:.0%}")
    console.print(table)
