"""The data card of a scenes data set: the measured properties that make it a test of text-guided selection.

``card`` is computed by ``generate`` from what it drew (label maps, objects, questions) and written to
``card.json``; ``vlprune data scenes`` prints it. ``check_budget`` is the rule that a keep rate must leave at
least as many image tokens as a scene can have objects.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, List, Sequence

import numpy as np


def covered_patches(labels: np.ndarray, patch: int) -> int:
    """Patches (``patch`` x ``patch`` px, the image cropped to whole patches) holding at least one object pixel."""
    g = labels.shape[0] // patch
    lab = labels[: g * patch, : g * patch] > 0
    return int(lab.reshape(g, patch, g, patch).any(axis=(1, 3)).sum())


def kept_tokens(num_patches: int, keep: float) -> int:
    """Image tokens a keep rate leaves (at least one)."""
    return max(1, int(math.floor(keep * num_patches + 1e-9)))


def check_budget(max_objects: int, num_patches: int, keep: float, where: str = "") -> None:
    """ValueError when keeping ``keep`` of ``num_patches`` leaves fewer tokens than ``max_objects``: then a
    method could not keep one patch of every object even in principle."""
    if not 0 < keep <= 1:
        raise ValueError(f"{where}keep must be in (0, 1], got {keep!r}")
    k = kept_tokens(num_patches, keep)
    if k < max_objects:
        raise ValueError(f"{where}keep {keep:g} of {num_patches} patches leaves {k} tokens, fewer than the "
                         f"{max_objects} objects a scene can have: raise the keep, the image size or lower "
                         f"max_objects to at most {k}")


def _balance(vqa: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per question type: count, answer shares, and the largest share over the uniform share (1.0 = even)."""
    out = {}
    for t in sorted({q["type"] for q in vqa}):
        c = Counter(q["answer"][0] for q in vqa if q["type"] == t)
        n = sum(c.values())
        top = max(c.values()) / n
        out[t] = {"questions": n, "answers": {a: round(v / n, 3) for a, v in sorted(c.items())},
                  "max_share_over_uniform": round(top * len(c), 2),
                  "majority": round(top, 3)}
    return out


def card(scenes: List[Dict[str, Any]], covered: Sequence[int], vqa: Sequence[Dict[str, Any]], image_size: int,
         patch: int, keep: float) -> Dict[str, Any]:
    """The measured properties of a generated set (``covered``: object patches per image, ``covered_patches``)."""
    g = image_size // patch
    budget = kept_tokens(g * g, keep)
    cov = np.asarray(covered, dtype=np.float64)
    n_obj = np.array([len(s["objects"]) for s in scenes], dtype=np.float64)
    by_image: Dict[str, List[Dict[str, Any]]] = {}
    for q in vqa:
        by_image.setdefault(q["image"], []).append(q)
    per_img = [len(v) for v in by_image.values()]
    distinct = [len({tuple(q["objects"]) for q in v}) / len(v) for v in by_image.values()]
    objs = {s["image"]: s["objects"] for s in scenes}
    shared = []
    for q in vqa:  # does some other object share the colour or the shape of the first asked-about object?
        if q["type"] == "count" or not q["objects"]:
            continue
        os_ = objs[q["image"]]
        o = next(p for p in os_ if p["id"] == q["objects"][0])
        shared.append(any(p["id"] != o["id"] and (p["colour"] == o["colour"] or p["shape"] == o["shape"]) for p in os_))
    sizes = [int(((b := o["bbox"])[2] - b[0])) for s in scenes for o in s["objects"]]
    return {
        "image_size": image_size, "patch_size": patch, "patches": g * g, "keep": keep, "kept_tokens": budget,
        "objects_per_image": {"mean": round(float(n_obj.mean()), 2), "min": int(n_obj.min()), "max": int(n_obj.max())},
        "object_patches_per_image": {"mean": round(float(cov.mean()), 1), "min": int(cov.min())},
        "objects_to_budget": {"mean": round(float(cov.mean()) / budget, 2), "min": round(float(cov.min()) / budget, 2)},
        "object_width_px": {"mean": round(float(np.mean(sizes)), 1), "min": int(min(sizes)), "max": int(max(sizes))},
        "questions_per_image": round(float(np.mean(per_img)), 2) if per_img else 0.0,
        "distinct_objects_share": round(float(np.mean(distinct)), 3) if distinct else 0.0,
        "distractor_share": round(float(np.mean(shared)), 3) if shared else 0.0,
        "answers": _balance(vqa),
    }


def card_lines(c: Dict[str, Any]) -> List[str]:
    """The card as short lines of text (what ``vlprune data scenes`` prints)."""
    o2b = c["objects_to_budget"]
    lines = [
        f"objects per image {c['objects_per_image']['mean']} ({c['objects_per_image']['min']}-"
        f"{c['objects_per_image']['max']}), {c['object_width_px']['mean']} px wide on average "
        f"({c['object_width_px']['min']}-{c['object_width_px']['max']}) in {c['image_size']} px images",
        f"object patches per image {c['object_patches_per_image']['mean']} of {c['patches']} ({c['patch_size']} px "
        f"patches); keep {c['keep']:g} keeps {c['kept_tokens']}: objects-to-budget ratio {o2b['mean']} "
        f"(lowest image {o2b['min']})",
        f"questions per image {c['questions_per_image']}, about different objects in {c['distinct_objects_share']:.0%} "
        f"of them; asked-about object has a distractor of the same colour or shape in "
        f"{c['distractor_share']:.0%}",
    ]
    for t, b in c["answers"].items():
        ans = ", ".join(f"{a} {v:.0%}" for a, v in b["answers"].items())
        lines.append(f"{t}: {b['questions']} questions; {ans}; largest answer {b['max_share_over_uniform']}x its "
                     f"even share")
    return lines
