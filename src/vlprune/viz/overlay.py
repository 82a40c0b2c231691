"""Which patches a method keeps: the image with kept, fused/merged and dropped patches marked at every reduction.

The patch statuses (kept / fused / merged / dropped) come from ``vlprune.reduce.trace.patch_status``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..reduce.state import FUSED, MERGED, LayerTrace
from ..reduce.trace import DROPPED, STATUS_NAMES, Panel, patch_status  # noqa: F401  (re-exported)


def trace_records(model: torch.nn.Module, output) -> List[Tuple[str, LayerTrace]]:
    """(slot group, record) pairs of a traced forward pass: ``model.trace_records(output)``."""
    return model.trace_records(output)


# RGBA tints drawn over the patches: dropped dark, fused blue, merged orange, kept untouched
TINTS = {DROPPED: (0.0, 0.0, 0.0, 0.72), FUSED: (0.12, 0.35, 0.95, 0.5), MERGED: (1.0, 0.55, 0.0, 0.5)}


def _image_array(image: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """(H, W, 3) float in [0, 1] from an (H, W, 3) / (3, H, W) array or tensor (uint8 or float in [0, 1])."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W, 3) or (3, H, W), got shape {a.shape}")
    a = a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0)
    return np.clip(np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a, 0.0, 1.0)


def _tint(img: np.ndarray, status: np.ndarray) -> np.ndarray:
    H, W, _ = img.shape
    g = status.shape[0]
    if H % g or W % g:
        raise ValueError(f"image size {H}x{W} is not a multiple of the {g}x{g} patch grid")
    per = np.kron(status, np.ones((H // g, W // g), dtype=status.dtype))
    out = img.copy()
    for s, (r, gr, b, a) in TINTS.items():
        m = per == s
        out[m] = (1 - a) * out[m] + a * np.array([r, gr, b], dtype=np.float32)
    return out


def _grid_lines(ax, p: Panel, H: int, W: int) -> None:
    """Faint patch grid, plus white borders between patches covered by different surviving tokens (so that
    merged / fused groups show as regions)."""
    g = p.status.shape[0]
    ph, pw = H / g, W / g
    for i in range(1, g):
        ax.axhline(i * ph - 0.5, color="white", lw=0.3, alpha=0.3)
        ax.axvline(i * pw - 0.5, color="white", lw=0.3, alpha=0.3)
    if p.owner is None:
        return
    o = p.owner
    segs = []
    for i, j in zip(*np.nonzero(o[1:, :] != o[:-1, :])):  # border below row i
        segs.append([(j * pw - 0.5, (i + 1) * ph - 0.5), ((j + 1) * pw - 0.5, (i + 1) * ph - 0.5)])
    for i, j in zip(*np.nonzero(o[:, 1:] != o[:, :-1])):  # border right of column j
        segs.append([((j + 1) * pw - 0.5, i * ph - 0.5), ((j + 1) * pw - 0.5, (i + 1) * ph - 0.5)])
    if segs:
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection(segs, colors="white", linewidths=1.0, alpha=0.9))


def _save(fig, out: Union[str, Path], title: Optional[str], dpi: int, rect=(0, 0, 1, 1)) -> None:
    """Title, tight layout (inside ``rect``) and a PNG at ``out`` (its folder made)."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=rect)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")


def draw_overlay(image, panels: Sequence[Panel], title: Optional[str] = None, cols: int = 4):
    """A matplotlib Figure (Agg): the input image, then one panel per reduction with the patches marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    img = _image_array(image)
    n = 1 + len(panels)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.7 * rows + (0.5 if title else 0)))
    FigureCanvasAgg(fig)  # the Agg backend, without touching matplotlib's global backend
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    axes[0].imshow(img)
    axes[0].set_title("input", fontsize=9)
    for ax, p in zip(axes[1:], panels):
        ax.imshow(_tint(img, p.status))
        _grid_lines(ax, p, img.shape[0], img.shape[1])
        ax.set_title(p.title, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    legend = [Patch(facecolor="none", edgecolor="grey", label="kept")] + [
        Patch(color=TINTS[s][:3], alpha=TINTS[s][3], label=STATUS_NAMES[s]) for s in (FUSED, MERGED, DROPPED)]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def save_overlay(image, panels: Sequence[Panel], out: Union[str, Path], title: Optional[str] = None, cols: int = 4) -> int:
    """Write the overlay figure as a PNG; returns the number of panels (1 input + one per reduction)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_overlay(image, panels, title, cols)
    fig.savefig(out, dpi=110, format="png")
    return 1 + len(panels)


def save_comparison(image, rows: Sequence[Tuple[str, Sequence[Panel]]], out: Union[str, Path],
                    title: Optional[str] = None) -> Tuple[int, int]:
    """One image under several texts: a row per (text, panels) with the input and each reduction, so that the
    patches different questions keep can be compared. Writes a PNG; returns (rows, columns) of the grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("save_comparison needs at least one (text, panels) row")
    img = _image_array(image)
    cols = 1 + max(len(p) for _, p in rows)
    fig = Figure(figsize=(2.8 * cols, 3.0 * len(rows) + (0.5 if title else 0)))
    FigureCanvasAgg(fig)
    for r, (text, panels) in enumerate(rows):
        ax = fig.add_subplot(len(rows), cols, r * cols + 1)
        ax.imshow(img)
        ax.set_title(text if len(text) <= 40 else text[:37] + "...", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        for c, p in enumerate(panels):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 2)
            ax.imshow(_tint(img, p.status))
            _grid_lines(ax, p, img.shape[0], img.shape[1])
            ax.set_title(p.title, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
    _save(fig, out, title, dpi=100)
    return len(rows), cols



def save_question_grid(image, questions: Sequence[Tuple[str, Optional[np.ndarray]]], columns: Sequence[str],
                       panels: Sequence[Sequence[Panel]], out: Union[str, Path], title: Optional[str] = None) -> Tuple[int, int]:
    """One image under several questions, method by method: a row per question (its text, and the asked-about
    objects outlined from a (H, W) bool mask, or None), a column per method showing its patches after its last
    reduction (``panels[row][col]``). Writes a PNG; returns (rows, columns) of the grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not questions or not columns:
        raise ValueError("save_question_grid needs at least one question and one method column")
    if len(panels) != len(questions) or any(len(p) != len(columns) for p in panels):
        raise ValueError(f"panels must be {len(questions)} rows of {len(columns)} (one per question and method)")
    img = _image_array(image)
    cols = 1 + len(columns)
    fig = Figure(figsize=(2.4 * cols, 2.6 * len(questions) + 0.6 + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    for r, (text, outline) in enumerate(questions):
        for c in range(cols):
            ax = fig.add_subplot(len(questions), cols, r * cols + c + 1)
            p = None if c == 0 else panels[r][c - 1]
            ax.imshow(img if p is None else _tint(img, p.status))
            if p is not None:
                _grid_lines(ax, p, img.shape[0], img.shape[1])
            if outline is not None and outline.any():
                if outline.shape != img.shape[:2]:
                    raise ValueError(f"outline mask {outline.shape} does not match the image {img.shape[:2]}")
                ax.contour(outline.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
            head = text if len(text) <= 34 else text[:31] + "..."
            ax.set_title(head if c == 0 else f"{columns[c - 1]}\n{p.title.splitlines()[-1]}", fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
    legend = [Patch(facecolor="none", edgecolor="grey", label="kept"), Patch(facecolor="none", edgecolor="lime",
                                                                             label="asked-about object")] + [
        Patch(color=TINTS[s][:3], alpha=TINTS[s][3], label=STATUS_NAMES[s]) for s in (FUSED, MERGED, DROPPED)]
    fig.legend(handles=legend, loc="lower center", ncol=5, fontsize=8, frameon=False)
    _save(fig, out, title, dpi=100, rect=(0, 0.04, 1, 1))
    return len(questions), cols


def save_heat_overlay(image: np.ndarray, grid: torch.Tensor, out, title: Optional[str] = None,
                      boxes: Sequence[Sequence[float]] = (), choice: Optional[int] = None) -> None:
    """A PNG of the (H, W, 3) image in [0, 1] beside it with the patch heat (g, g) upsampled on top, candidate
    boxes outlined (the chosen one in red). ``vlprune visualize --heat`` draws it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    H, W = image.shape[:2]
    from ..tasks.refgrounding import upsample

    heat = upsample(grid, H, W).numpy()
    fig = Figure(figsize=(6.4, 3.7))
    FigureCanvasAgg(fig)
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a.imshow(image)
    a.set_title("input", fontsize=9)
    b.imshow(image)
    b.imshow(heat, cmap="jet", alpha=0.5)
    b.set_title("grounding heat", fontsize=9)
    for i, (x, y, w, h) in enumerate(boxes):
        b.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, lw=1.5 if i == choice else 0.8,
                              edgecolor="red" if i == choice else "white"))
    for ax in (a, b):
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, out, title, dpi=110)


__all__ = ["Panel", "save_heat_overlay", "save_comparison", "save_question_grid", "patch_status", "trace_records", "draw_overlay", "save_overlay", "DROPPED", "STATUS_NAMES"]
