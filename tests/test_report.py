"""report.py: figures are real PNGs, the HTML page is self-contained, tables are correct."""

import base64
import re

import matplotlib.image as mpimg
import pytest

from headgraft.report import Report, markdown_table, plot_bars, plot_confusion, plot_curves


def _png_size(path):
    img = mpimg.imread(path)
    return img.shape[1], img.shape[0]


def test_figures_are_real_pngs(tmp_path):
    steps = [0, 10, 20]
    curves = {"imprint": {"old": [0.9, 0.95, 0.96], "new": [0.5, 0.8, 0.9]},
              "zeros": {"old": [0.99, 0.9, 0.95], "new": [0.0, 0.6, 0.85]}}
    paths = [
        plot_curves(curves, steps, tmp_path / "curves.png", title="t"),
        plot_bars({"naive": {"old": 0.1, "new": 1.0, "all": 0.4},
                   "joint": {"old": 0.98, "new": 0.97, "all": 0.98}},
                  tmp_path / "bars.png", reference="joint"),
        plot_confusion([[5, 1], [0, 7]], ["a", "b"], tmp_path / "cm.png", num_old=1),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = _png_size(p)
        assert w >= 300 and h >= 200
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_markdown_table_formats_fractions_as_percent():
    md = markdown_table([{"name": "x", "acc": 0.9567, "steps": 12}], ["name", "acc", "steps"])
    assert md.splitlines()[0] == "| name | acc | steps |"
    assert "| x | 95.7% | 12 |" in md


def test_report_html_inlines_images_and_renders_tables(tmp_path):
    fig = plot_confusion([[1, 0], [0, 1]], ["a", "b"], tmp_path / "cm.png")
    rep = Report("Demo")
    rep.add("Numbers", markdown_table([{"k": "v", "acc": 0.5}], ["k", "acc"]) +
            "\n```bash\nheadgraft demo\n```", [fig])
    paths = rep.write(tmp_path, data={"acc": 0.5})
    page = paths["html"].read_text()
    assert "<table>" in page and "<th>acc</th>" in page and "<td>50.0%</td>" in page
    m = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert m and base64.b64decode(m.group(1)) == fig.read_bytes()
    assert "![cm](cm.png)" in paths["markdown"].read_text()
    assert paths["json"].read_text().strip().startswith("{")


def test_report_write_refuses_missing_folder(tmp_path):
    from headgraft.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        Report("x").write(tmp_path / "nope")
