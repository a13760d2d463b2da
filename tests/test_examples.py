"""The short examples in examples/ run and do what they say (the quick ones; the Trainer and
ONNX examples are covered by tests/learn/test_hf_trainer.py and tests/test_export.py)."""

from __future__ import annotations

import ast
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_own_loop_example_learns_new_digits_and_keeps_old_ones(capsys) -> None:
    runpy.run_path(str(EXAMPLES / "own_loop.py"), run_name="__main__")
    summary = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    # measured: old 0.95, new 0.938, all 0.946 (20 exemplars per old digit, 30 epochs)
    assert summary["old_accuracy"] >= 0.92
    assert summary["new_accuracy"] >= 0.90
    assert summary["all_accuracy"] >= 0.92


def test_every_example_is_valid_python_with_a_usage_line() -> None:
    files = sorted(EXAMPLES.glob("*.py"))
    assert {f.name for f in files} >= {"own_loop.py", "hf_trainer.py", "serve_onnx.py"}
    for f in files:
        doc = ast.get_docstring(ast.parse(f.read_text()))
        assert doc and f"python examples/{f.name}" in doc, f.name
