"""`headgraft inspect | add | remove | stats`: graft files, not just live models.

Thin wrappers: parse, call :mod:`headgraft.io.sources` and the core API, print. Exit codes:
0 success; 2 bad usage or input (nothing written); 1 other failures, a failed write included
(nothing written); 130 interrupted with Ctrl-C (nothing written).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..errors import HeadgraftError, InputError
from ..inits import BIASES, INITS
from ._app import app, console, console_err, print_json

EXIT_CODES = "Exit codes: 0 success; 2 bad input or usage; 1 other failure; 130 interrupted."


class Interrupted(HeadgraftError):
    """Ctrl-C during a command; atomic writes leave no partial output."""

    exit_code = 130


# ----------------------------------------------------------------------------- shared options

ModelArg = typer.Argument(
    None,
    metavar="MODEL",
    show_default=False,
    help="A Hugging Face folder, or a weights file (.safetensors, "
    "model.safetensors.index.json, .pt/.pth/.bin); with --arch, the weights file.",
)
ArchOpt = typer.Option(
    None,
    "--arch",
    help="Build the model: timm:NAME, torchvision:NAME or "
    "package.module:factory (your own code; called with num_classes=).",
)
WeightsOpt = typer.Option(None, "--weights", help="The trained weights for --arch.")
HeadOpt = typer.Option(
    None,
    "--head",
    help="The head's module path (fc, classifier.6) or, in a bare checkpoint, "
    "its tensor prefix; comma-separated heads grow together.",
)
PickleOpt = typer.Option(
    False,
    "--trust-pickle",
    help="Load .pt files that hold pickled objects (can run code: only for files you trust).",
)
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")
ForceOpt = typer.Option(False, "--force", help="Replace an existing output (never the input).")
BatchOpt = typer.Option(64, "--batch-size", min=1, help="Examples per batch for --data.")
CacheDirOpt = typer.Option(
    None,
    "--cache-dir",
    help="Feature cache folder for image/text --data (default: $HEADGRAFT_CACHE or "
    "~/.cache/headgraft/features); a second run on the same model and files runs no forward.",
)
NoCacheOpt = typer.Option(False, "--no-cache", help="Compute features without the cache.")
InitArgOpt = typer.Option(
    [],
    "--init-arg",
    help="Initialiser setting KEY=VALUE (repeatable), e.g. source=cat for "
    "copy, distribution=xavier_uniform for random.",
)


def _split_labels(text: str) -> list[str]:
    return [x.strip() for x in text.split(",")]


def _init_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--init-arg {pair!r} is not KEY=VALUE; e.g. --init-arg source=cat")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


@contextlib.contextmanager
def _command() -> Iterator[list[warnings.WarningMessage]]:
    """Run a command quietly: library warnings are kept for the end (errors stay one line),
    transformers' progress bars are off, and Ctrl-C becomes a one-line error."""
    with contextlib.suppress(ModuleNotFoundError):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            yield caught
        except KeyboardInterrupt:
            raise Interrupted(
                "interrupted; no output was written and the input is unchanged"
            ) from None
    seen = set()
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        if text and text not in seen:
            seen.add(text)
            console_err.print(
                f"warning: {text}", style="dim", highlight=False, markup=False, soft_wrap=True
            )


def _norms(module: Any) -> tuple[Any, Any]:
    from ..graft import full_rows

    w, b = full_rows(module)
    return w.float().reshape(w.shape[0], -1).norm(dim=1), (None if b is None else b.float())


def _summary(t: Any) -> dict[str, float] | None:
    if t is None or t.numel() == 0:
        return None
    return {
        "mean": float(t.mean()),
        "std": float(t.std()) if t.numel() > 1 else 0.0,
        "min": float(t.min()),
        "max": float(t.max()),
    }


def _head_report(loaded: Any, split_at: int | None = None) -> dict[str, Any]:
    """Head path, shape, dtype, labels and row-norm statistics (old/new split at a row)."""
    from ..heads import get_module

    h = loaded.find_head()
    info = h.to_dict()
    norms, bias = _norms(get_module(loaded.target, h.path))
    rows: dict[str, Any] = {"all": _summary(norms)}
    if split_at is not None and 0 < split_at < len(norms):
        rows = {"old": _summary(norms[:split_at]), "new": _summary(norms[split_at:])}
    info.update({"row_norms": rows, "bias_values": _summary(bias)})
    if loaded.head_tensors:
        info["tensors"] = [t for h in loaded.head_tensors for t in (h.weight, h.bias) if t]
    return info


def _print_head(title: str, info: dict[str, Any], labels: list[str]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    shape = f"{info['num_classes']} x {info['in_features']}"
    table.add_row("head", ", ".join(info["paths"]) or "<the model itself>")
    table.add_row("kind", f"{info['kind']} ({info['layout']}), bias: {info['bias']}")
    table.add_row("shape", f"{shape} (classes x features), {info['dtype']} on {info['device']}")
    if info.get("tensors"):
        table.add_row("tensors", ", ".join(info["tensors"]))
    for part, s in info["row_norms"].items():
        if s:
            table.add_row(
                f"row norms ({part})",
                f"mean {s['mean']:.4g}  std {s['std']:.4g}  min {s['min']:.4g}  max {s['max']:.4g}",
            )
    if info["bias_values"]:
        s = info["bias_values"]
        table.add_row(
            "bias values",
            f"mean {s['mean']:.4g}  std {s['std']:.4g}  min {s['min']:.4g}  max {s['max']:.4g}",
        )
    shown = ", ".join(labels[:30]) + (f" ... ({len(labels)} in all)" if len(labels) > 30 else "")
    table.add_row("labels", shown)
    console.print(table)


def _feature_cache(cache_dir: str | None, no_cache: bool) -> Any:
    """The feature cache of a command (None with --no-cache)."""
    from ..io.cache import FeatureCache

    return None if no_cache else FeatureCache(cache_dir)


def _cache_report(cache: Any) -> dict[str, Any] | None:
    return None if cache is None else cache.report.to_dict()


def _load(
    model: str | None, arch: str | None, weights: str | None, head: str | None, trust_pickle: bool
) -> Any:
    from ..io.sources import load_model

    return load_model(model, arch=arch, weights=weights, head=head, trust_pickle=trust_pickle)


# ----------------------------------------------------------------------------- inspect


@app.command(epilog=EXIT_CODES)
def inspect(
    model: str | None = ModelArg,
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    head: str | None = HeadOpt,
    trust_pickle: bool = PickleOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show a model's head: path, shape, dtype, labels, row-norm statistics.

    Examples:

      headgraft inspect ./my-bert-classifier

      headgraft inspect model.safetensors --json

      headgraft inspect --arch timm:resnet50 --weights resnet50.pth
    """
    with _command():
        loaded = _load(model, arch, weights, head, trust_pickle)
        info = {
            "source": loaded.source,
            "kind": loaded.kind,
            "head": _head_report(loaded),
            "labels": loaded.labels.names,
        }
    if json_out:
        print_json(info)
    else:
        _print_head(f"{loaded.source} ({loaded.kind})", info["head"], info["labels"])


# ----------------------------------------------------------------------------- add


@app.command(epilog=EXIT_CODES)
def add(
    model: str | None = ModelArg,
    labels: str = typer.Option(..., "--labels", "-l", help="New class names, comma-separated."),
    out: str = typer.Option(
        ...,
        "--out",
        "-o",
        help="Where to write the grown model (a "
        "folder for Hugging Face and sharded sources, else a file).",
    ),
    init: str = typer.Option(
        "auto",
        "--init",
        help="How new rows start: auto (imprint with --data, stats with "
        f"--stats, else random) or one of: {', '.join(INITS.names())}.",
    ),
    init_arg: list[str] = InitArgOpt,
    bias: str = typer.Option(
        "auto",
        "--bias",
        help="New rows' bias: auto (the initialiser's own, else mean) or one "
        f"of: {', '.join(BIASES.names())}.",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Examples: an image folder (one sub-folder per class), a "
        ".jsonl/.csv with text and label, or a .safetensors/.npz of features and labels.",
    ),
    stats: str | None = typer.Option(
        None,
        "--stats",
        help="Class statistics from `headgraft stats` (for --init stats, --bias prior/silent).",
    ),
    head: str | None = HeadOpt,
    layout: str = typer.Option(
        "fused",
        "--layout",
        help="fused or split while grafting; files always hold one "
        "fused layer (old rows bit-identical either way).",
    ),
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    optimizer: str | None = typer.Option(
        None,
        "--optimizer",
        help="A saved optimizer state (torch.save of "
        "optimizer.state_dict(), or a training checkpoint holding one under 'optimizer') to "
        "grow with the head.",
    ),
    optimizer_out: str | None = typer.Option(
        None, "--optimizer-out", help="Where to write the grown optimizer state."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for random initialisers."),
    batch_size: int = BatchOpt,
    cache_dir: str | None = CacheDirOpt,
    no_cache: bool = NoCacheOpt,
    trust_pickle: bool = PickleOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Grow the head by new classes; old rows stay bit-identical, labels grow in step.

    The output is written atomically in the source's own format, then re-opened
    to check that every old row is bit-identical before success is reported.

    Examples:

      headgraft add ./bert-sentiment --labels sarcasm --data few.jsonl -o ./bert-4

      headgraft add model.safetensors --labels fox,owl --init mean
        -o grown.safetensors

      headgraft add --arch timm:resnet18 --weights r18.pth --labels fox
        --data imgs/ -o out.safetensors

      headgraft add --arch mypkg.nets:build --weights w.safetensors --labels fox
        --optimizer opt.pt --optimizer-out opt-grown.pt -o grown.safetensors
    """
    from ..graft import LAYOUTS
    from ..io.atomic import check_output
    from ..io.sources import add_labels, check_output_name, save_model, verify_output

    with _command():
        new = _split_labels(labels)
        if init != "auto":
            INITS.get(init)
        if bias != "auto":
            BIASES.get(bias)
        if layout not in LAYOUTS:
            raise InputError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        options = _init_options(init_arg)
        if (optimizer is None) != (optimizer_out is None):
            raise InputError("--optimizer and --optimizer-out go together; pass both")
        sources = [model, weights, optimizer, data, stats]
        check_output(out, sources, force=force)
        if optimizer_out is not None:
            check_output(optimizer_out, [*sources, out], force=force)
        loaded = _load(model, arch, weights, head, trust_pickle)
        check_output_name(loaded, out)
        old = loaded.labels
        grown = old.extend(new)  # duplicate or existing names fail here, before any work
        examples = stats_obj = cache = None
        if data is not None:
            from ..data import load_data
            from ..io.cache import cached

            examples = load_data(data, loaded=loaded, labels=grown.names, batch_size=batch_size)
            cache = _feature_cache(cache_dir, no_cache)
            examples = cached(examples, cache)
        if stats is not None:
            from ..stats import ClassStats

            stats_obj = ClassStats.load(stats)
        opt_state = _read_optimizer(optimizer, trust_pickle) if optimizer else None
        add_labels(
            loaded,
            new,
            init=init,
            bias=bias,
            examples=examples,
            stats=stats_obj,
            seed=seed,
            layout=layout,
            init_options=options,
        )
        opt_grown = _grow_optimizer(loaded, opt_state) if opt_state is not None else None
        report = _head_report(loaded, split_at=len(old))
        save_model(loaded, out, force=force)
        verified = verify_output(loaded, out)
        if opt_grown is not None:
            _write_optimizer(opt_grown, optimizer_out, force=force)
    result = {
        "source": loaded.source,
        "kind": loaded.kind,
        "output": out,
        "added": new,
        "init": init,
        "bias": bias,
        "num_classes": {"before": len(old), "after": len(grown)},
        "head": report,
        "verified": verified,
        "labels": loaded.labels.names,
        "optimizer_output": optimizer_out,
        "cache": _cache_report(cache),
    }
    if json_out:
        print_json(result)
        return
    _print_head(f"grew {len(old)} -> {len(grown)} classes: {out}", report, loaded.labels.names)
    console.print(
        f"[green]verified[/]: {verified['rows_verified']} old rows bit-identical in "
        f"{out}" + (f"; optimizer state grown into {optimizer_out}" if optimizer_out else ""),
        highlight=False,
    )


def _read_optimizer(path: str, trust_pickle: bool) -> dict[str, Any]:
    from collections.abc import Mapping

    from ..io.checkpoint import load_torch_file

    if not Path(path).is_file():
        raise InputError(f"--optimizer {path} does not exist; check the path")
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    for candidate in (obj, obj.get("optimizer") if isinstance(obj, Mapping) else None):
        if isinstance(candidate, Mapping) and {"state", "param_groups"} <= set(candidate):
            return dict(candidate)
    raise InputError(
        f"{path} holds no optimizer state (a dict with 'state' and "
        "'param_groups', or one under 'optimizer'); save optimizer.state_dict()"
    )


def _grow_optimizer(loaded: Any, state: dict[str, Any]) -> dict[str, Any]:
    from ..graft import fuse
    from ..io.optim import grow_optimizer_state, head_param_ids

    rows = loaded.row_map
    if loaded.model is not None:
        loaded.set_target(fuse(loaded.target, head=loaded.head))
        return grow_optimizer_state(state, loaded.model, head=loaded.head, rows=rows)
    assert loaded.checkpoint is not None
    shapes = [
        loaded.checkpoint.shape(t) for h in loaded.head_tensors for t in (h.weight, h.bias) if t
    ]
    ids = head_param_ids(state, shapes, what="--optimizer")
    return grow_optimizer_state(state, params=ids, rows=rows)


def _write_optimizer(state: dict[str, Any], out: str, *, force: bool) -> None:
    import torch

    from ..io.atomic import atomic_path

    try:
        with atomic_path(out, force=force) as tmp:
            torch.save(state, tmp)
    except OSError as e:
        raise HeadgraftError(
            f"writing {out} failed ({e.strerror or e}); nothing was written"
        ) from None


# ----------------------------------------------------------------------------- remove


@app.command(epilog=EXIT_CODES)
def remove(
    model: str | None = ModelArg,
    labels: str = typer.Option(..., "--labels", "-l", help="Classes to drop, comma-separated."),
    out: str = typer.Option(..., "--out", "-o", help="Where to write the smaller model."),
    head: str | None = HeadOpt,
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    trust_pickle: bool = PickleOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Drop classes from the head; the remaining rows are kept bit for bit.

    Examples:

      headgraft remove ./bert-4 --labels sarcasm -o ./bert-3

      headgraft remove model.safetensors --labels fox
        -o smaller.safetensors
    """
    from ..io.atomic import check_output
    from ..io.sources import check_output_name, remove_labels, save_model, verify_output

    with _command():
        drop = _split_labels(labels)
        check_output(out, [model, weights], force=force)
        loaded = _load(model, arch, weights, head, trust_pickle)
        check_output_name(loaded, out)
        before = len(loaded.labels)
        remove_labels(loaded, drop)
        save_model(loaded, out, force=force)
        verified = verify_output(loaded, out)
    result = {
        "source": loaded.source,
        "kind": loaded.kind,
        "output": out,
        "removed": drop,
        "num_classes": {"before": before, "after": len(loaded.labels)},
        "verified": verified,
        "labels": loaded.labels.names,
    }
    if json_out:
        print_json(result)
        return
    console.print(
        f"removed {', '.join(drop)}: {before} -> {len(loaded.labels)} classes in "
        f"{out}; [green]verified[/]: {verified['rows_verified']} kept rows "
        "bit-identical",
        highlight=False,
    )


# ----------------------------------------------------------------------------- stats


@app.command(epilog=EXIT_CODES)
def stats(
    model: str | None = ModelArg,
    data: str = typer.Option(
        ...,
        "--data",
        help="Examples: an image folder, a .jsonl/.csv "
        "with text and label, or a .safetensors/.npz of features.",
    ),
    out: str = typer.Option(..., "--out", "-o", help="The statistics file (.safetensors)."),
    head: str | None = HeadOpt,
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    batch_size: int = BatchOpt,
    cache_dir: str | None = CacheDirOpt,
    no_cache: bool = NoCacheOpt,
    trust_pickle: bool = PickleOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Collect per-class statistics of the head's inputs (for --init stats).

    Examples:

      headgraft stats ./bert-sentiment --data train.jsonl -o stats.safetensors

      headgraft stats head.safetensors --data features.npz -o stats.safetensors
    """
    from ..io.atomic import check_output
    from ..stats import ClassStats

    with _command():
        if Path(out).suffix != ".safetensors":
            raise InputError(
                f"statistics are saved as safetensors; name the output *.safetensors, not {out}"
            )
        check_output(out, [model, weights, data], force=force)
        from ..data import load_data
        from ..io.cache import cached

        loaded = _load(model, arch, weights, head, trust_pickle)
        cache = _feature_cache(cache_dir, no_cache)
        examples = cached(load_data(data, loaded=loaded, batch_size=batch_size), cache)
        known = loaded.labels.names
        order = [c for c in known if c in examples.classes]
        order += [c for c in examples.classes if c not in known]
        result = ClassStats.collect(
            loaded.target, examples, labels=order, head=loaded.head, batch_size=batch_size
        )
        try:
            result.save(out, force=force)
        except OSError as e:
            raise HeadgraftError(
                f"writing {out} failed ({e.strerror or e}); nothing was written"
            ) from None
    summary = {
        "source": loaded.source,
        "output": out,
        "dim": result.dim,
        "counts": dict(zip(result.labels, result.counts.tolist())),
        "cache": _cache_report(cache),
    }
    if json_out:
        print_json(summary)
        return
    console.print(
        f"statistics of {result.total} examples, {len(result.labels)} classes, "
        f"{result.dim} features -> {out}",
        highlight=False,
    )
