"""`headgraft demo`: the main job on the built-in digits data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._app import app, console, print_json


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report, plots, "
                                      "checkpoints and JSON.")] = Path("headgraft-demo"),
    seeds: Annotated[int, typer.Option(help="Seeds per strategy (mean ± spread when > 1).")] = 3,
    quick: Annotated[bool, typer.Option("--quick", help="One seed, shorter base training and "
                                        "curves (for tests).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
) -> None:
    """Train an MLP on digits 0-6, add 7-9, and measure every way of doing it.

    Grafts with every initialiser and bias policy, learns with every strategy (naive,
    distillation, replay, data-free statistics, the recommended combination) beside a model
    retrained on all ten digits, and writes report.md, report.html, PNG plots and
    results.json to --out.

    Examples:
      headgraft demo
      headgraft demo --out /tmp/demo --seeds 5
      headgraft demo --quick --json
    """
    from ..demo import DemoConfig, run_demo, write_report

    cfg = DemoConfig(out=out, seeds=seeds, quick=quick)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    from ..demo import STRATEGIES
    from ..inits import INITS

    total = seeds * (2 + len(STRATEGIES)) + len(INITS) + 1
    with Progress(*columns, console=console, transient=True, disable=json_out) as bar:
        task = bar.add_task("starting", total=total)

        def tick(msg: str) -> None:
            bar.update(task, description=msg, advance=1)

        res = run_demo(cfg, tick)
        bar.update(task, description="writing the report")
        paths = write_report(res, cfg)
    if json_out:
        print_json({"strategies": {k: {m: v[m] for m in ("old_accuracy", "new_accuracy",
                                                          "all_accuracy", "old_as_new")}
                                   for k, v in res.strategies.items()},
                    "files": {k: str(p) for k, p in paths.items()},
                    "seconds": res.seconds})
        return
    table = Table(title="Digits 7-9 added to a 0-6 model: test accuracy")
    for col in ("strategy", "old", "new", "all", "old→new"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, v in res.strategies.items():
        table.add_row(name, *(f"{100 * v[k]:.1f}%" for k in (
            "old_accuracy", "new_accuracy", "all_accuracy", "old_as_new")))
    console.print(table)
    console.print(f"report: {paths['html']}  ({res.seconds['total']:.0f} s)")
