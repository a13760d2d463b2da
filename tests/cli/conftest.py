"""Two ways to run the command line: the installed script in a subprocess (the real thing, for
end-to-end checks) and ``headgraft.cli.main`` in this process (the same parser, commands and
error mapping, without paying torch's import again)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(sys.executable).with_name("headgraft")


@dataclass
class Result:
    """What a command returned: its exit code and output streams."""

    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.returncode == 0, self.stderr
        return json.loads(self.stdout)

    def ok(self) -> Result:
        assert self.returncode == 0, self.stderr
        return self


def run_subprocess(*args: str, cwd: Path | None = None, **kwargs: Any) -> Result:
    """The installed console script (``python -m headgraft`` where it is missing)."""
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "headgraft"]
    proc = subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300, **kwargs
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_inprocess(*args: str) -> Result:
    from headgraft.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture()
def headgraft_sub() -> Callable[..., Result]:
    return run_subprocess


@pytest.fixture()
def headgraft_cli() -> Callable[..., Result]:
    return run_inprocess
