"""The command line: thin wrappers that parse, call the API and print.

Each group of commands lives in its own module and registers itself on ``app``; errors of the
package's own hierarchy become one line on stderr and the documented exit code (2 for bad
input or usage, 1 for other failures).
"""

from __future__ import annotations

import sys

from ..errors import HeadgraftError
from ._app import app, console_err

# command modules register themselves on `app` when imported
from . import demo_cmd  # noqa: E402,F401  isort: skip

for _optional in ("graft_cmds", "learn_cmds", "export_cmds"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as e:  # a command group not written yet
        if e.name != f"{__name__}.{_optional}":
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``headgraft`` console script; returns the exit code."""
    try:
        app(args=argv, prog_name="headgraft")
    except HeadgraftError as e:
        console_err.print(f"error: {e}", highlight=False, soft_wrap=True, markup=False)
        return e.exit_code
    except SystemExit as e:  # click's own exit: 0, or 2 for usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run() -> None:
    sys.exit(main())


__all__ = ["app", "main", "run"]
