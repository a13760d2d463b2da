"""`headgraft learn` and `headgraft evaluate`: train new classes without forgetting, and prove it.

Thin wrappers: open the model and data with :mod:`headgraft.io.sources` and
:func:`headgraft.data.load_data`, call :func:`headgraft.learn.learn` and
:func:`headgraft.evaluate.evaluate`, print. Every strategy option's choices come from its
registry. Under ``torchrun`` every rank trains and rank 0 writes and prints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..errors import InputError
from ..learn import (
    CALIBRATIONS,
    DEVICES,
    DISTILL_TARGETS,
    FREEZES,
    OPTIMIZERS,
    PRECISIONS,
    PRIORS,
    RECIPES,
    REGIMES,
    REPLAYS,
    SAMPLINGS,
    SCHEDULES,
    SELECTIONS,
    SOLVERS,
)
from ._app import app, console, print_json
from .graft_cmds import (
    EXIT_CODES,
    ArchOpt,
    BatchOpt,
    CacheDirOpt,
    ForceOpt,
    HeadOpt,
    JsonOpt,
    ModelArg,
    NoCacheOpt,
    PickleOpt,
    WeightsOpt,
    _cache_report,
    _command,
    _feature_cache,
    _load,
    _split_labels,
)


def _choices(registry: Any, extra: tuple[str, ...] = ()) -> str:
    return ", ".join([*extra, *registry.names()])


def _opt(default: Any, flag: str, help_text: str) -> Any:
    return typer.Option(default, flag, help=help_text, show_default=default is not None)


# ----------------------------------------------------------------------------- learn


@app.command(epilog=EXIT_CODES)
def learn(
    model: str | None = ModelArg,
    data: str = typer.Option(
        ...,
        "--data",
        help="Examples of the new classes (old-class examples may be mixed in): an image "
        "folder, a .jsonl/.csv with text and label, or a .safetensors/.npz of features.",
    ),
    out: str = typer.Option(
        ..., "--out", "-o", help="Where to write the trained model (same format as MODEL)."
    ),
    new_labels: str | None = typer.Option(
        None,
        "--new-labels",
        help="The new classes, comma-separated, when MODEL already has their rows (after "
        "`headgraft add`); classes in --data that MODEL lacks are added automatically.",
    ),
    stats: str | None = typer.Option(
        None,
        "--stats",
        help="Statistics of the old classes (`headgraft stats` on the old data, before "
        "grafting): enables the data-free paths.",
    ),
    old_data: str | None = typer.Option(
        None,
        "--old-data",
        help="Old-class examples for the exemplar memory (only --memory-per-class per class "
        "are used, or those listed in --memory).",
    ),
    memory: str | None = typer.Option(
        None, "--memory", help="An exemplar memory (JSON) indexing --old-data."
    ),
    memory_out: str | None = typer.Option(
        None, "--memory-out", help="Write the exemplar memory chosen from --old-data here."
    ),
    test: str | None = typer.Option(
        None, "--test", help="Labelled test data scored before and after learning."
    ),
    recipe: str = _opt("auto", "--recipe", f"Starting settings: {_choices(RECIPES)}."),
    regime: str | None = _opt(None, "--regime", f"{_choices(REGIMES)}."),
    solve: str | None = _opt(None, "--solve", f"Head solve: {_choices(SOLVERS, ('auto',))}."),
    replay: str | None = _opt(None, "--replay", f"{_choices(REPLAYS)}."),
    freeze: str | None = _opt(None, "--freeze", f"Comma-separated: {_choices(FREEZES)}."),
    calibrate: str | None = _opt(
        None, "--calibrate", f"Post-hoc correction: {_choices(CALIBRATIONS)}."
    ),
    alpha: float | None = _opt(None, "--alpha", "Distillation weight (0 turns it off)."),
    temperature: float | None = _opt(None, "--temperature", "Distillation temperature T."),
    distill_on: str | None = _opt(None, "--distill-on", f"{_choices(DISTILL_TARGETS)}."),
    feature_distill: float | None = _opt(
        None, "--feature-distill", "Weight of feature distillation on the head's input."
    ),
    epochs: int | None = _opt(None, "--epochs", "Training epochs (default: by strategy)."),
    batch_size: int = BatchOpt,
    cache_dir: str | None = CacheDirOpt,
    no_cache: bool = NoCacheOpt,
    lr: float | None = _opt(None, "--lr", "Learning rate of the head."),
    backbone_lr: float | None = _opt(
        None, "--backbone-lr", "Backbone learning rate as a multiple of --lr."
    ),
    weight_decay: float | None = _opt(None, "--weight-decay", "Weight decay."),
    optimizer: str | None = _opt(None, "--optimizer", f"{_choices(OPTIMIZERS)}."),
    schedule: str | None = _opt(None, "--schedule", f"{_choices(SCHEDULES)}."),
    sampling: str | None = _opt(None, "--sampling", f"{_choices(SAMPLINGS)}."),
    memory_per_class: int | None = _opt(
        None, "--memory-per-class", "Exemplars kept per old class from --old-data."
    ),
    memory_selection: str | None = _opt(None, "--memory-selection", f"{_choices(SELECTIONS)}."),
    wa_clip: bool = typer.Option(
        False,
        "--wa-clip",
        help="Weight aligning's clipping step: head weights >= 0 after "
        "each training step (for non-negative features such as ReLU outputs).",
    ),
    holdout: float | None = _opt(None, "--holdout", "Share held out for calibration."),
    shrinkage: float | None = _opt(
        None, "--shrinkage", "Covariance shrinkage of closed-form solves (default: OAS)."
    ),
    prior: str | None = _opt(None, "--prior", f"{_choices(PRIORS)}."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice."),
    device: str = typer.Option("auto", "--device", help=f"{_choices(DEVICES)}."),
    precision: str = typer.Option("auto", "--precision", help=f"{_choices(PRECISIONS)}."),
    checkpoint_dir: str | None = typer.Option(
        None,
        "--checkpoint-dir",
        help="Where the per-epoch checkpoint goes (default: OUT.learn-checkpoint).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the checkpoint (same settings: same result)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    head: str | None = HeadOpt,
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    trust_pickle: bool = PickleOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Learn new classes without forgetting the old ones, then write the model.

    New classes in --data that the model lacks are grafted (rows from class statistics);
    old classes are kept by distillation, an exemplar memory (--old-data) or their
    statistics (--stats). Scores before and after are printed when --test is given.
    Distributed: torchrun --nproc_per_node N $(which headgraft) learn ...

    Examples:

      headgraft learn ./bert --data new.jsonl --stats old-stats.safetensors -o ./bert-grown

      headgraft learn --arch timm:resnet18 --weights r18.safetensors --data new/ \\
        --old-data old/ --regime full --epochs 5 --test test/ -o r18-grown.safetensors

      headgraft learn head.safetensors --data feats.npz --stats s.safetensors -o out.safetensors
    """
    from ..io.atomic import check_output
    from ..io.sources import _compose, check_output_name, save_model
    from ..learn import ExemplarMemory, LearnConfig
    from ..learn import distributed as D
    from ..learn import learn as run_learn
    from ..stats import ClassStats

    settings = {
        k: v
        for k, v in dict(
            regime=regime,
            solve=solve,
            replay=replay,
            freeze=freeze,
            calibrate=calibrate,
            alpha=alpha,
            temperature=temperature,
            distill_on=distill_on,
            feature_distill=feature_distill,
            epochs=epochs,
            lr=lr,
            backbone_lr=backbone_lr,
            weight_decay=weight_decay,
            optimizer=optimizer,
            schedule=schedule,
            sampling=sampling,
            memory_per_class=memory_per_class,
            memory_selection=memory_selection,
            holdout=holdout,
            shrinkage=shrinkage,
            prior=prior,
        ).items()
        if v is not None
    }
    settings.update(seed=seed, device=device, precision=precision, batch_size=batch_size)
    if wa_clip:
        settings["wa_clip"] = True
    with _command():
        LearnConfig.from_recipe(recipe, **settings)  # every name checked before any work
        if memory is not None and old_data is None:
            raise InputError("--memory indexes the old data; pass --old-data too")
        sources = [model, weights, data, stats, old_data, memory, test]
        check_output(out, [s for s in sources if s], force=force)
        if memory_out is not None:
            check_output(memory_out, [s for s in [*sources, out] if s], force=force)
        loaded = _load(model, arch, weights, head, trust_pickle)
        check_output_name(loaded, out)
        target = loaded.target
        h = loaded.find_head()
        if loaded.model is None and h.path != "" and not _is_features(data):
            loaded.require_model("learning from inputs other than features")
        n_before = h.num_classes
        from ..io.cache import cached

        cache = _feature_cache(cache_dir, no_cache)  # used by the frozen regime
        train = cached(_open(data, loaded, batch_size), cache)
        test_data = _open(test, loaded, batch_size) if test else None
        old = _open(old_data, loaded, batch_size) if old_data else None
        stats_obj = ClassStats.load(stats) if stats else None
        mem = ExemplarMemory.load(memory) if memory else None
        ckpt = checkpoint_dir or f"{out.rstrip('/')}.learn-checkpoint"
        config = LearnConfig.from_recipe(recipe, **settings, head=loaded.head)
        result = run_learn(
            target,
            train,
            recipe="auto",
            **config.to_dict(),
            new_labels=_split_labels(new_labels) if new_labels else None,
            stats=stats_obj,
            memory=mem,
            old_data=old,
            eval_data=test_data,
            checkpoint_dir=ckpt,
            resume=resume,
            progress=progress and not json_out,
        )
        loaded.set_target(result.model)
        n_after = len(result.labels)
        if n_after != n_before:
            _compose(loaded, [*range(n_before), *([None] * (n_after - n_before))])
        if not D.is_main():
            return
        save_model(loaded, out, force=force)
        if memory_out is not None and result.memory is not None:
            if old_data:
                result.memory.source = str(old_data)
            result.memory.save(memory_out, force=force)
    summary = {**_learn_summary(result, out, ckpt, memory_out), "cache": _cache_report(cache)}
    if json_out:
        print_json(summary)
        return
    _print_learn(result, summary)


def _is_features(path: str) -> bool:
    return Path(path).suffix in (".safetensors", ".npz")


def _open(path: str, loaded: Any, batch_size: int) -> Any:
    from ..data import load_data

    return load_data(path, loaded=loaded, batch_size=batch_size)


def _learn_summary(result: Any, out: str, ckpt: str, memory_out: str | None) -> dict[str, Any]:
    d = result.to_dict()
    return {
        "output": out,
        "checkpoint_dir": ckpt,
        "memory_output": memory_out,
        "labels": d["labels"],
        "old_labels": result.old_labels,
        "new_labels": result.new_labels,
        "resolved": d["resolved"],
        "solve": d["solve"],
        "correction": d["correction"],
        "memory": d["memory"],
        "history": d["history"],
        "before": d["before"],
        "after": d["after"],
        "seconds": d["seconds"],
        "resumed_from": d["resumed_from"],
        "config": d["config"],
    }


def _pct(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}%"


METRICS = (
    ("old classes", "old_accuracy"),
    ("new classes", "new_accuracy"),
    ("all classes", "all_accuracy"),
    ("harmonic mean", "harmonic_mean"),
    ("old predicted as new", "old_as_new"),
    ("forgetting", "forgetting"),
    ("calibration error (ECE)", "ece"),
)


def _print_learn(result: Any, summary: dict[str, Any]) -> None:
    r = summary["resolved"]
    console.print(
        f"learned {', '.join(result.new_labels)} into {len(result.old_labels)} old classes: "
        f"regime {r['regime']}, solve {r['solve']}, replay {r['replay']}, freeze "
        f"{r['freeze']}, {r['epochs']} epochs on {r['device']}"
        + (f" x {r['world_size']}" if r.get("world_size", 1) > 1 else "")
        + f"; correction: {(summary['correction'] or {}).get('name', 'none')}",
        highlight=False,
    )
    if result.before is not None and result.after is not None:
        table = Table(title="test accuracy", title_justify="left")
        for col in ("", "before", "after"):
            table.add_column(col, justify="left" if not col else "right")
        for name, key in METRICS:
            table.add_row(name, _pct(getattr(result.before, key)), _pct(getattr(result.after, key)))
        console.print(table)
    else:
        console.print("[dim]pass --test DATA to see old/new/all accuracy before and after[/]")
    console.print(
        f"[green]wrote[/] {summary['output']} ({len(result.labels)} classes, "
        f"{summary['seconds'].get('total', 0):.1f}s)",
        highlight=False,
    )


# ----------------------------------------------------------------------------- evaluate


@app.command(epilog=EXIT_CODES)
def evaluate(
    model: str | None = ModelArg,
    data: str = typer.Option(..., "--data", help="Labelled test data (same formats as learn)."),
    new_labels: str | None = typer.Option(
        None,
        "--new-labels",
        help="The added classes, comma-separated (default: none, or "
        "those the --reference model lacks).",
    ),
    old_labels: str | None = typer.Option(
        None, "--old-labels", help="The original classes, comma-separated."
    ),
    reference: str | None = typer.Option(
        None, "--reference", help="The model before grafting (same --arch), for forgetting."
    ),
    batch_size: int = BatchOpt,
    head: str | None = HeadOpt,
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    trust_pickle: bool = PickleOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Score a model: old / new / all accuracy, harmonic mean, old predicted as new,
    per-class accuracy, forgetting against --reference, calibration error, confusion.

    Examples:

      headgraft evaluate ./bert-grown --data test.jsonl --reference ./bert

      headgraft evaluate grown.safetensors --arch timm:resnet18 --data test/ \\
        --new-labels fox,owl --json
    """
    from ..evaluate import evaluate as run_evaluate

    with _command():
        loaded = _load(model, arch, weights, head, trust_pickle)
        target = loaded.target
        if loaded.model is None and not _is_features(data):
            loaded.require_model("evaluating on inputs other than features")
        test = _open(data, loaded, batch_size)
        ref = None
        if reference is not None:
            ref = _load(
                None if arch else reference, arch, reference if arch else None, head, trust_pickle
            ).target
        report = run_evaluate(
            target,
            test,
            old_labels=_split_labels(old_labels) if old_labels else None,
            new_labels=_split_labels(new_labels) if new_labels else None,
            reference=ref,
            batch_size=batch_size,
            head=loaded.head,
        )
    if json_out:
        print_json(report.to_dict())
        return
    _print_report(report, str(model or weights))


def _print_report(report: Any, name: str) -> None:
    table = Table(title=f"{name}: {report.num_examples} examples", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    for label, key in METRICS:
        table.add_row(label, _pct(getattr(report, key)))
    console.print(table)
    per = Table(title="per class", title_justify="left")
    per.add_column("class")
    per.add_column("group")
    per.add_column("examples", justify="right")
    per.add_column("accuracy", justify="right")
    for c, acc in report.per_class.items():
        group = "old" if c in report.old_labels else "new" if c in report.new_labels else "-"
        per.add_row(c, group, str(report.support[c]), _pct(acc))
    console.print(per)
    if len(report.labels) <= 20:
        conf = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
        conf.add_column("")
        for c in report.labels:
            conf.add_column(c, justify="right")
        for c, row in zip(report.labels, report.confusion):
            conf.add_row(c, *[str(v) if v else "." for v in row])
        console.print(conf)
