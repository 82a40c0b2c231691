"""Grounding of a token selection on the scenes data (which has per-object masks).

For a question about specific objects, after the last reduction of the image encoder:
  precision = share of the individually kept patches that overlap one of the question's objects (TiP's
              "alignment precision");
  recall    = share of the objects' patches that are still individually kept.
A patch overlaps an object when any of its pixels belongs to it in the scene's label map. The same numbers for
``random`` selection at the same keep rate give the chance level. Patches inside a fused or merged token count as
not kept (they no longer have a token of their own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from ..reduce.state import KEPT
from ..reduce.trace import patch_status


def object_patches(labels: np.ndarray, object_ids: Sequence[int], grid: int) -> np.ndarray:
    """(S, S) label map (pixel = object id, 0 = background) -> (grid, grid) bool: patch overlaps an object."""
    S = labels.shape[0]
    if labels.shape != (S, S) or S % grid:
        raise ValueError(f"label map of shape {labels.shape} does not split into a {grid}x{grid} patch grid")
    p = S // grid
    hit = np.isin(labels, np.asarray(list(object_ids)))
    return hit.reshape(grid, p, grid, p).any(axis=(1, 3))


def alignment(kept: np.ndarray, target: np.ndarray) -> Dict[str, float]:
    """Precision and recall of kept patches (bool grids) against the target patches."""
    inter = float((kept & target).sum())
    return {
        "precision": inter / max(float(kept.sum()), 1.0),
        "recall": inter / max(float(target.sum()), 1.0),
    }


def load_labels(root: Path, mask_rel: str, size: int) -> np.ndarray:
    from PIL import Image

    path = root / mask_rel
    if not path.is_file():
        raise FileNotFoundError(f"object mask not found: {path}")
    img = Image.open(path)
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img)


@torch.inference_mode()
def grounding_scores(
    model: nn.Module,
    entries: List[Dict[str, Any]],
    masks: Dict[str, str],
    root: Path,
    loader,
    tokenizer,
    batch_size: int = 32,
) -> Dict[str, float]:
    """Mean precision / recall over VQA entries that name their ``objects``.

    ``masks`` maps an entry's image path to its label-map path (from the scenes metadata), ``root`` is the data
    directory, ``loader`` an ImageLoader for the model and ``tokenizer`` the run's TextTokenizer.
    Returns {"precision", "recall", "questions"}; without any reduction every patch is kept.
    """
    model.eval()
    cfg = model.cfg.vision
    usable = [e for e in entries if e.get("objects") and e["image"] in masks]
    if not usable:
        raise ValueError("no questions with object annotations and masks to measure grounding on")
    precs: List[float] = []
    recs: List[float] = []
    for s in range(0, len(usable), batch_size):
        chunk = usable[s : s + batch_size]
        images = torch.stack([loader(e["image"]) for e in chunk])
        ids, mask = tokenizer.encode([e["question"] for e in chunk], model.cfg.text.max_len)
        p = next(model.parameters())
        out = model(images.to(p.device), ids.to(p.device), mask.to(p.device), trace=True)
        records = [r for r in model.trace_records(out) if r[0] in ("vision", "joint")]
        for i, e in enumerate(chunk):
            labels = load_labels(root, masks[e["image"]], cfg.image_size)
            grid = cfg.grid
            target = object_patches(labels, e["objects"], grid)
            if records:
                status = patch_status(records, sample=i)[-1].status
                if status.shape != (grid, grid):
                    raise ValueError(f"grounding needs the model's own patch grid ({grid}x{grid}), got {status.shape}")
                kept = status == KEPT
            else:
                kept = np.ones((grid, grid), dtype=bool)
            a = alignment(kept, target)
            precs.append(a["precision"])
            recs.append(a["recall"])
    return {"precision": float(np.mean(precs)), "recall": float(np.mean(recs)), "questions": len(precs)}
