"""The shared typer application and consoles (imported by every command module)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="headgraft",
    help="Grow a trained classifier's head to new classes without losing the old ones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
console_err = Console(stderr=True)


def print_json(data: Any) -> None:
    """Machine output for ``--json``: one JSON document on stdout."""
    typer.echo(json.dumps(data, indent=2, default=str))


@app.callback()
def _root() -> None:
    """Grow a trained classifier's head to new classes without losing the old ones.

    graft (add, remove, inspect, stats) -> learn -> evaluate; `headgraft demo` shows it all on
    built-in data.
    """
