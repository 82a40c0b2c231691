"""RefCOCO+ (UNC split) from the ``refer`` release (``refcoco+.zip``): ``refcoco+/refs(unc).p`` and
``refcoco+/instances.json``, with the COCO ``train2014/`` images.

``refs(unc).p`` is a pickle of a list of ``{"ref_id", "ann_id", "image_id", "split": "train" | "val" | "testA" |
"testB", "sentences": [{"raw", "sent", ...}], "category_id", ...}``; it is read with an unpickler that refuses
every class and function, so a pickle can only yield plain lists, dicts, strings and numbers. ``instances.json``
gives each ``ann_id`` its box (``bbox`` = [x, y, w, h] in pixels).

Output (``vlprune.prepare.refcoco.check_grounding`` checks it; ALBEF's grounding files plus the box):
``[{"image", "text", "ref_id", "bbox": [x, y, w, h]}]``, one entry per expression, in ``train.json``,
``val.json``, ``testA.json``, ``testB.json``.
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

from .common import LayoutError, Split, Target, load_release_json, require_fields

REFS = "refcoco+/refs(unc).p"
INSTANCES = "refcoco+/instances.json"


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - refuse any global
        raise LayoutError(f"refcoco+: {REFS} refers to {module}.{name}; the release's pickle holds only plain "
                          "lists and dicts, so this file is refused")


def load_refs(path: Path) -> List[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            refs = _PlainUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        if isinstance(e, LayoutError):
            raise
        raise LayoutError(f"refcoco+: {path} is not the refer toolkit's pickle ({e})") from None
    if not isinstance(refs, list):
        raise LayoutError(f"refcoco+: {path} must hold a list of refs, got {type(refs).__name__}")
    require_fields(refs, ("ref_id", "ann_id", "image_id", "split", "sentences"), str(path), "refcoco+")
    return refs


@lru_cache(maxsize=2)
def _load(root: str, mtime: int):
    refs = load_refs(Path(root) / REFS)
    inst = load_release_json(Path(root) / INSTANCES, "refcoco+")
    if not isinstance(inst, dict) or "annotations" not in inst:
        raise LayoutError(f"refcoco+: {INSTANCES} has no 'annotations' (not the refer release's instances.json)")
    boxes = {a["id"]: [float(v) for v in a["bbox"]] for a in inst["annotations"]}
    return refs, boxes


def check_grounding(entries: List[Dict[str, Any]], where: str) -> None:
    for i, e in enumerate(entries):
        box = e.get("bbox")
        if not (isinstance(e.get("image"), str) and isinstance(e.get("text"), str) and e["text"].strip()
                and isinstance(box, list) and len(box) == 4 and box[2] > 0 and box[3] > 0):
            raise ValueError(f"{where}: entry {i} needs image, a non-empty text and bbox [x, y, w, h] with w, h > 0; "
                             f"got {e!r}")


def ref_split(split: str):
    def run(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
        refs, boxes = _load(str(root), (root / REFS).stat().st_mtime_ns)
        out = []
        for r in refs:
            if r["split"] != split:
                continue
            if r["ann_id"] not in boxes:
                raise LayoutError(f"refcoco+: ref {r['ref_id']} names annotation {r['ann_id']}, which "
                                  f"{INSTANCES} lacks (files from different releases?)")
            image = f"train2014/COCO_train2014_{int(r['image_id']):012d}.jpg"
            for s in r["sentences"]:
                text = (s.get("sent") or s.get("raw") or "").strip()
                if text:
                    out.append({"image": image, "text": text, "ref_id": r["ref_id"], "bbox": boxes[r["ann_id"]]})
        check_grounding(out, f"refcoco+ {split}")
        return out
    return run


# published counts: expressions (entries) and images per split
REFCOCO_PLUS = Target(
    "refcoco+", "RefCOCO+ (UNC)", (REFS, INSTANCES, "train2014"),
    (Split("train", ref_split("train"), "grounding", (120_624, 16_992)),
     Split("val", ref_split("val"), "grounding", (10_758, 1_500)),
     Split("testA", ref_split("testA"), "grounding", (5_726, 750)),
     Split("testB", ref_split("testB"), "grounding", (4_889, 750))),
    layout="ROOT/refcoco+/refs(unc).p, ROOT/refcoco+/instances.json, ROOT/train2014/COCO_train2014_*.jpg",
)
