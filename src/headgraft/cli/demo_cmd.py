"""`headgraft demo`: the main job on the built-in digits data."""

from __future__ import annotations

import typer
from rich.table import Table

from ._app import app, console, print_json


@app.command()
def demo(
    json_out: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
    shots: int = typer.Option(10, help="Examples per new class given to the initialisers."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train an MLP on digits 0-6, graft 7-9 with every initialiser and bias policy, and
    show old / new / all test accuracy before any training.

    Example: headgraft demo
    """
    from ..demo import graft_table

    with console.status("training the base model on digits 0-6 and grafting 7-9 ..."):
        rows = graft_table(shots=shots, seed=seed)
    if json_out:
        print_json([r.__dict__ for r in rows])
        return
    table = Table(title="Digits 7-9 grafted onto a 0-6 MLP, before any training")
    for col in ("init", "bias", "old acc", "new acc", "all acc"):
        table.add_column(col, justify="right" if "acc" in col else "left")
    for r in rows:
        table.add_row(r.init, r.bias, f"{r.old:.1%}", f"{r.new:.1%}", f"{r.all:.1%}")
    console.print(table)
