"""The report pieces the demo uses: curve plots, sectioned reports, and the sentences generated from numbers."""

import pytest

from vlprune.demo import QUICK
from vlprune.demo.summary import compare, fmt_p, sentences
from vlprune.viz.plots import Series, plot_curves
from vlprune.viz.report import Figure, Section, Table, write_sections


def test_plot_curves_and_sections(tmp_path):
    s = [Series("a", [1.0, 2.0, None], [50.0, 60.0, 70.0], [45.0, 55.0, 65.0], [55.0, 65.0, 75.0], labels=["x", "y", "z"]),
         Series("tuned", [1.5], [58.0], line=False, marker="s", color=0)]
    png = plot_curves(s, tmp_path / "c.png", "GFLOPs", "acc", title="t", reference=("unpruned", 2.5, 61.0),
                      band=("blind", 30.0, 25.0, 35.0))
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves([Series("empty", [None], [1.0])], tmp_path / "e.png", "x", "y")
    md, html = write_sections(tmp_path, "T", [
        Section("One", text=["a sentence"], bullets=["b1"], tables=[Table([{"m": "trips", "v": 1.234}], [("m", "method", ""), ("v", "value", ".1f")], "cap")]),
        Section("Two", figures=[Figure(png, "the curve")])])
    text = md.read_text()
    assert "## One" in text and "a sentence" in text and "- b1" in text and "| trips | 1.2 |" in text and "*cap*" in text
    assert "![the curve](c.png)" in text
    page = html.read_text()
    assert "<h2>Two</h2>" in page and '<img src="c.png"' in page and "<li>b1</li>" in page


def _rows(u, b):
    return [{"method": "none", "setup": "fine-tuned unpruned", "vqa_acc": u, "vqa_low": u - 4, "vqa_high": u + 4},
            {"method": "blind", "setup": "image replaced by grey", "vqa_acc": b, "vqa_low": b - 4, "vqa_high": b + 4}]


def test_sentences_say_when_the_comparison_is_uninformative():
    prof = QUICK
    n = 200
    good, blind = [1.0] * 150 + [0.0] * 50, [1.0] * 60 + [0.0] * 140
    trips, evit = [1.0] * 120 + [0.0] * 80, [1.0] * 90 + [0.0] * 110
    tests = [{"a": "none", "b": "blind", "setup": "fine-tuned", "keep": None, **compare(good, blind, 500)},
             {"a": "trips", "b": "evit", "setup": "at inference", "keep": min(prof.sweep), **compare(trips, evit, 500)},
             {"a": "trips", "b": "random", "setup": "at inference", "keep": min(prof.sweep), **compare(trips, trips, 500)}]
    said, clear = sentences(prof, _rows(75.0, 30.0), tests)
    assert clear and "the model uses the image" in said[1] and said[0].startswith("Smoke run")
    assert "TRIPS (60.0%) is 15.0 points above EViT (45.0%" in said[2] and "McNemar p < 0.001" in said[2]
    assert "TRIPS (60.0%) is not significantly different from random (60.0%)" in said[3]
    tests[0] = {"a": "none", "b": "blind", "setup": "fine-tuned", "keep": None, **compare(blind, blind, 500)}
    said, clear = sentences(prof, _rows(30.0, 30.0), tests)
    assert not clear and "not clearly above the blind baseline" in said[1] and "uninformative" in said[1]
    assert len(good) == n and fmt_p(0.0123) == "p = 0.012" and fmt_p(None) == "n/a"
