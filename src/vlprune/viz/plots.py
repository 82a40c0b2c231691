"""Trade-off plots: accuracy against throughput, one point per method (matplotlib, Agg, PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Union


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
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return out


__all__ = ["plot_tradeoff"]
