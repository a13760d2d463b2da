"""Tables and plots of results: markdown, a self-contained HTML page, PNG figures, JSON.

Plotting uses matplotlib's Agg backend (no display needed); every figure is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]], steps: Sequence[int], path: Path,
    *, title: str = "",
) -> Path:
    """Old- and new-class accuracy against training steps, one line per series.

    ``curves[name]`` holds ``{"old": [...], "new": [...]}`` measured at ``steps``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, c in curves.items():
        for ax, key in zip(axes, ("new", "old")):
            ax.plot(steps, [100 * v for v in c[key]], marker="o", ms=3, label=name)
    for ax, key in zip(axes, ("new", "old")):
        ax.set_title(f"{key}-class accuracy")
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(-2, 102)
    axes[1].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_bars(
    results: Mapping[str, Mapping[str, float]], path: Path, *, reference: str | None = None,
    keys: Sequence[str] = ("old", "new", "all"), title: str = "",
) -> Path:
    """Grouped bars of ``keys`` per strategy; the ``reference`` strategy is hatched."""
    plt = _pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(names))]
        vals = [100 * results[n][key] for n in names]
        bars = ax.bar(xs, vals, width, label=key)
        for b, n in zip(bars, names):
            if n == reference:
                b.set_hatch("//")
        for x, v in zip(xs, vals):
            ax.text(x, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 110)
    ax.legend(ncol=len(keys), fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_confusion(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, *,
    num_old: int | None = None,
    title: str = "",
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), old/new boundary marked."""
    import numpy as np

    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    norm = m / np.clip(m.sum(1, keepdims=True), 1, None)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(0.55 * n + 2.5, 0.55 * n + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    if num_old is not None and 0 < num_old < n:
        for f in (ax.axhline, ax.axvline):
            f(num_old - 0.5, color="crimson", lw=1.2, ls="--")
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table; floats in [0, 1] are shown as percentages."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{100 * v:.1f}%" if 0 <= v <= 1 else f"{v:.3g}"
        return str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |\n"
                          for r in rows)


@dataclass
class Report:
    """A report in sections of markdown text and figures, written as report.md + report.html."""

    title: str
    sections: list[tuple[str, str, list[Path]]] = field(default_factory=list)

    def add(self, heading: str, text: str = "", figures: Sequence[Path] = ()) -> None:
        self.sections.append((heading, text, list(figures)))

    def to_markdown(self, folder: Path) -> str:
        out = [f"# {self.title}\n"]
        for heading, text, figs in self.sections:
            out.append(f"\n## {heading}\n\n{text}\n")
            out += [f"\n![{f.stem}]({os.path.relpath(f, folder)})\n" for f in figs]
        return "".join(out)

    def to_html(self) -> str:
        """A self-contained page: figures are inlined as data URIs, tables rendered."""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for heading, text, figs in self.sections:
            body.append(f"<h2>{html.escape(heading)}</h2>")
            body.append(_md_to_html(text))
            for f in figs:
                data = base64.b64encode(Path(f).read_bytes()).decode()
                body.append(f'<figure><img alt="{html.escape(f.stem)}" '
                            f'src="data:image/png;base64,{data}"></figure>')
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
                 "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0}"
                 "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
                 "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}code,pre{background:#f6f6f6}"
                 "pre{padding:.6em;overflow-x:auto}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>"
                f"{html.escape(self.title)}</title><style>{style}</style></head><body>"
                + "\n".join(body) + "</body></html>")

    def write(self, folder: str | os.PathLike[str], data: Any = None) -> dict[str, Path]:
        """Write report.md, report.html (and results.json when ``data`` is given)."""
        folder = Path(folder)
        paths = {"markdown": folder / "report.md", "html": folder / "report.html"}
        with atomic_path(paths["markdown"]) as tmp:
            tmp.write_text(self.to_markdown(folder))
        with atomic_path(paths["html"]) as tmp:
            tmp.write_text(self.to_html())
        if data is not None:
            paths["json"] = folder / "results.json"
            with atomic_path(paths["json"]) as tmp:
                tmp.write_text(json.dumps(data, indent=2, default=float))
        return paths


def _md_to_html(text: str) -> str:
    """Just enough markdown for our own reports: tables, code blocks, paragraphs, bullets."""
    out: list[str] = []
    lines = text.strip().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|-: "):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, *rest = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                       + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>"
                                                           for c in r) + "</tr>" for r in rest)
                       + "</table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{html.escape(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
            i += 1
        else:
            i += 1
    return "\n".join(out)
