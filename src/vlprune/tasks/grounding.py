"""Grounding and text relevance of a token selection on the scenes data (which has per-object masks).

The one place where "did the selection keep the object the question asks about?" is computed: the demo reports
from ``selection_records`` / ``grounding_scores`` and the aggregations below, and the tests check them on grids
built by hand.

Definitions (after the image encoder's last reduction; a *patch* is one cell of the model's patch grid):

  kept        a patch is kept when a surviving token stands for it **alone**. Patches inside a fused token
              (TRIPS, EViT, ELIP) or a merged one (ToMe) count as not kept: they no longer have a token of their
              own, only a share of an average. Without any reduction every patch is kept.
  on object   a patch is on object k when any of its pixels has value k in the scene's label map.
  survives    object k survives when at least one kept patch is on it.

Per question (entries name the ids of the objects they are about in ``objects``):

  asked       share of the question's objects that survive (0/1 for a question about one object);
  others      share of the image's other objects (present in the label map, not asked about) that survive;
  survived    every asked object survives (the split of the accuracy uses this);
  precision   share of the kept patches that are on an asked object (TiP's "alignment precision");
  recall      share of the asked objects' patches that are kept.

A question with no objects (e.g. an existence question whose answer is "no") has no asked object: it takes no
part in any of these numbers. A question whose image has no other object has no ``others`` and takes no part in
the lift.

Aggregates (``relevance``):

  survival              mean of ``asked`` over the questions;
  relevance lift        mean over questions of ``asked - others``: about 0 for a selection that ignores the text
                        (any object as likely to survive as another), 1 when exactly the asked objects survive;
  question sensitivity  for every pair of questions about different object sets of the same image, the IoU of their
                        kept patch sets (two empty sets: 1); mean over the pairs. 1.0 for a selection that depends
                        on the image alone (EViT, ToMe, lowres, none); random selection draws other patches for
                        other questions too, so it is below 1 without reading the text;
  split accuracy        accuracy on the questions whose asked objects all survived, and on the others.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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
    hit = np.isin(labels, np.asarray(list(object_ids), dtype=np.int64))
    return hit.reshape(grid, p, grid, p).any(axis=(1, 3))


def alignment(kept: np.ndarray, target: np.ndarray) -> Dict[str, float]:
    """Precision and recall of kept patches (bool grids) against the target patches."""
    inter = float((kept & target).sum())
    return {
        "precision": inter / max(float(kept.sum()), 1.0),
        "recall": inter / max(float(target.sum()), 1.0),
    }


def surviving(kept: np.ndarray, labels: np.ndarray, object_ids: Sequence[int]) -> Dict[int, bool]:
    """Object id -> whether at least one kept patch (``kept``: (grid, grid) bool) is on it."""
    grid = kept.shape[0]
    return {int(k): bool((kept & object_patches(labels, [k], grid)).any()) for k in object_ids}


def question_selection(kept: np.ndarray, labels: np.ndarray, asked: Sequence[int]) -> Dict[str, Any]:
    """The per-question numbers of the module docstring for one kept grid and one label map. ``asked``: the
    question's object ids (empty: every field but ``kept`` is None). ``kept`` (patch indices) is returned for the
    question-sensitivity pairs."""
    kept = np.asarray(kept, dtype=bool)
    if kept.ndim != 2 or kept.shape[0] != kept.shape[1]:
        raise ValueError(f"kept must be a square (grid, grid) bool array, got shape {kept.shape}")
    present = [int(k) for k in np.unique(labels) if k != 0]
    asked = [int(k) for k in asked]
    idx = [int(i) for i in np.flatnonzero(kept)]
    if not asked:
        return {"asked": None, "others": None, "survived": None, "precision": None, "recall": None, "kept": idx}
    surv = surviving(kept, labels, sorted(set(present) | set(asked)))
    others = [k for k in present if k not in asked]
    a = alignment(kept, object_patches(labels, asked, kept.shape[0]))
    return {"asked": float(np.mean([surv[k] for k in asked])),
            "others": float(np.mean([surv[k] for k in others])) if others else None,
            "survived": all(surv[k] for k in asked), "precision": a["precision"], "recall": a["recall"], "kept": idx}


def kept_grid(records: Sequence, sample: int, grid: int) -> np.ndarray:
    """(grid, grid) bool: the patches of ``sample`` kept alone after the last image-side reduction of a traced
    forward pass (``records``: (group, LayerTrace) pairs of the vision / joint groups; none = every patch kept).
    A reduction that changes the grid (lower resolution) keeps nothing of the model's own grid."""
    if not records:
        return np.ones((grid, grid), dtype=bool)
    status = patch_status(records, sample=sample)[-1].status
    if status.shape != (grid, grid):
        return np.zeros((grid, grid), dtype=bool)
    return status == KEPT


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two sets of patch indices; two empty sets: 1."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def sensitivity_pairs(records: Sequence[Dict[str, Any]]) -> List[float]:
    """The IoU of the kept patch sets of every pair of questions about different (non-empty) object sets of the
    same image, image by image in first-seen order."""
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        if r.get("objects"):
            by.setdefault(r["image"], []).append(r)
    return [iou(a["kept"], b["kept"]) for qs in by.values() for a, b in combinations(qs, 2)
            if set(a["objects"]) != set(b["objects"])]


def _mean(xs: Sequence[float]) -> Optional[float]:
    return float(np.mean(xs)) if len(xs) else None


def lift_values(records: Sequence[Dict[str, Any]]) -> List[float]:
    """Per question ``asked - others`` (questions with asked objects and other objects only)."""
    return [r["asked"] - r["others"] for r in records if r.get("asked") is not None and r.get("others") is not None]


def split_scores(records: Sequence[Dict[str, Any]], scores: Dict[Any, float]) -> Dict[str, List[float]]:
    """The scores (``question_id`` -> score) of the questions whose asked objects all survived and of the others."""
    out: Dict[str, List[float]] = {"survived": [], "lost": []}
    for r in records:
        if r.get("survived") is not None and r["question_id"] in scores:
            out["survived" if r["survived"] else "lost"].append(float(scores[r["question_id"]]))
    return out


def relevance(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Means over the per-question records: survival, precision, recall, lift, question sensitivity."""
    q = [r for r in records if r.get("asked") is not None]
    lifts, pairs = lift_values(records), sensitivity_pairs(records)
    return {"survival": _mean([r["asked"] for r in q]), "precision": _mean([r["precision"] for r in q]),
            "recall": _mean([r["recall"] for r in q]), "lift": _mean(lifts), "sensitivity": _mean(pairs),
            "questions": len(q), "lift_questions": len(lifts), "pairs": len(pairs)}


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
def selection_records(model: nn.Module, entries: List[Dict[str, Any]], masks: Dict[str, str], root: Path, loader,
                      tokenizer, batch_size: int = 32, progress: bool = False) -> List[Dict[str, Any]]:
    """One record per entry that names its ``objects`` and whose image has a mask (``masks``: image path -> label
    map path, from the scenes metadata; ``root``: the data directory; ``loader``: an ImageLoader for the model;
    ``tokenizer``: the run's). A record is ``question_selection``'s dict plus question_id, image, objects, type."""
    from tqdm import tqdm

    model.eval()
    cfg = model.cfg.vision
    usable = [e for e in entries if e.get("objects") and e["image"] in masks]
    if not usable:
        raise ValueError("no questions with object annotations and masks to measure grounding on")
    out: List[Dict[str, Any]] = []
    labels: Dict[str, np.ndarray] = {}
    dev = next(model.parameters()).device
    for s in tqdm(range(0, len(usable), batch_size), desc="grounding", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        chunk = usable[s: s + batch_size]
        images = torch.stack([loader(e["image"]) for e in chunk])
        ids, mask = tokenizer.encode([e["question"] for e in chunk], model.cfg.text.max_len)
        res = model(images.to(dev), ids.to(dev), mask.to(dev), trace=True)
        records = [r for r in model.trace_records(res) if r[0] in ("vision", "joint")]
        for i, e in enumerate(chunk):
            if e["image"] not in labels:
                labels[e["image"]] = load_labels(root, masks[e["image"]], cfg.image_size)
            sel = question_selection(kept_grid(records, i, cfg.grid), labels[e["image"]], e["objects"])
            out.append({"question_id": e.get("question_id"), "image": e["image"], "objects": list(e["objects"]),
                        "type": e.get("type"), **sel})
    return out


def grounding_scores(model: nn.Module, entries: List[Dict[str, Any]], masks: Dict[str, str], root: Path, loader,
                     tokenizer, batch_size: int = 32, progress: bool = False) -> Dict[str, Any]:
    """``relevance`` of ``selection_records`` (see there for the arguments), with the per-question records
    (``records``, without the kept patch indices) and the question-sensitivity IoUs (``pairs_iou``)."""
    recs = selection_records(model, entries, masks, root, loader, tokenizer, batch_size, progress)
    pairs = sensitivity_pairs(recs)
    slim = [{k: v for k, v in r.items() if k != "kept"} for r in recs]
    return {**relevance(recs), "records": slim, "pairs_iou": pairs}


__all__ = ["object_patches", "alignment", "surviving", "question_selection", "kept_grid", "iou", "sensitivity_pairs",
           "lift_values", "split_scores", "relevance", "load_labels", "selection_records", "grounding_scores"]
