"""Trade-off plots (matplotlib, Agg, PNG): accuracy against throughput, one point per method
(``plot_tradeoff``), and accuracy-vs-cost curves, one line per method with error bars, a reference point and a
baseline band (``plot_curves``)."""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def plot_tradeoff(
    rows: Sequence[Dict],
    out: Union[str, Path],
    x: str = "throughput",
    y: str = "accuracy",
    label: str = "method",
    xlabel: Optional[str] = None,
    ylabel: Optional[str] = None,
    title: Optional[str] = None,
    baseline: Optional[str] = "none",
) -> Path:
    """Scatter ``y`` against ``x`` for the rows that have both, each point labelled with ``row[label]``.

    The ``baseline`` method's values are drawn as dotted guide lines, so that faster-and-as-accurate sits to the
    right of the vertical line and on or above the horizontal one. Raises ValueError when no row has both values.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(str(r.get(label)), _num(r.get(x)), _num(r.get(y))) for r in rows]
    pts = [(n, a, b) for n, a, b in pts if a is not None and b is not None]
    if not pts:
        raise ValueError(f"no row has numeric {x!r} and {y!r} to plot (rows: {len(rows)})")
    fig = Figure(figsize=(6.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, a, b) in enumerate(pts):
        ax.scatter([a], [b], s=46, color=f"C{i % 10}", zorder=3)
        ax.annotate(name, (a, b), textcoords="offset points", xytext=(5, 4), fontsize=9)
        if baseline is not None and name == baseline:
            ax.axvline(a, color="grey", ls=":", lw=1)
            ax.axhline(b, color="grey", ls=":", lw=1)
    return _finish(fig, ax, out, xlabel or x, ylabel or y, title)


def _finish(fig, ax, out: Union[str, Path], xlabel: str, ylabel: str, title: Optional[str], legend: bool = False) -> Path:
    """Labels, title, grid (and legend), then the PNG at ``out``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return out


@dataclass(frozen=True)
class Series:
    """One line (or, with ``line=False``, separate markers) of a curve plot: x, y and the y interval per point."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    low: Optional[Sequence[float]] = None
    high: Optional[Sequence[float]] = None
    line: bool = True
    marker: str = "o"
    labels: Sequence[str] = field(default_factory=tuple)  # optional text next to each point
    color: Optional[int] = None  # colour cycle index (default: the series' position); name "" = not in the legend


def plot_curves(
    series: Sequence[Series],
    out: Union[str, Path],
    xlabel: str,
    ylabel: str,
    title: Optional[str] = None,
    reference: Optional[Tuple[str, float, float]] = None,
    band: Optional[Tuple[str, float, float, float]] = None,
    logx: bool = False,
) -> Path:
    """Curves with error bars. ``reference``: (name, x, y) drawn as a star (the unpruned model); ``band``:
    (name, y, low, high) drawn as a horizontal line with a shaded interval (a baseline such as a blind model).
    Points with a missing x or y are left out; raises ValueError when nothing is left to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, s in enumerate(series):
        idx = [j for j in range(len(s.x)) if _num(s.x[j]) is not None and _num(s.y[j]) is not None]
        if not idx:
            continue
        xs, ys = [float(s.x[j]) for j in idx], [float(s.y[j]) for j in idx]
        err = None
        if s.low is not None and s.high is not None:
            err = [[max(0.0, ys[n] - float(s.low[j])) for n, j in enumerate(idx)],
                   [max(0.0, float(s.high[j]) - ys[n]) for n, j in enumerate(idx)]]
        c = f"C{(i if s.color is None else s.color) % 10}"
        ax.errorbar(xs, ys, yerr=err, label=s.name or "_nolegend_", color=c, marker=s.marker, capsize=3, ms=6,
                    ls="-" if s.line else "none", lw=1.4, zorder=3, mfc="white" if not s.line else c)
        for n, j in enumerate(idx):
            if j < len(s.labels) and s.labels[j]:
                ax.annotate(s.labels[j], (xs[n], ys[n]), textcoords="offset points", xytext=(4, 3), fontsize=7, color=c)
        drawn += 1
    if reference is not None and _num(reference[1]) is not None and _num(reference[2]) is not None:
        ax.scatter([reference[1]], [reference[2]], marker="*", s=180, color="black", zorder=4, label=reference[0])
        drawn += 1
    if band is not None and _num(band[1]) is not None:
        ax.axhline(band[1], color="grey", ls="--", lw=1.2, label=band[0])
        ax.axhspan(band[2], band[3], color="grey", alpha=0.15, lw=0)
    if not drawn:
        raise ValueError(f"nothing to plot: no series has numeric x and y ({len(series)} series)")
    if logx:
        ax.set_xscale("log")
    return _finish(fig, ax, out, xlabel, ylabel, title, legend=True)


__all__ = ["plot_tradeoff", "plot_curves", "Series"]
