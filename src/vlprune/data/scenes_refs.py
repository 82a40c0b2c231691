"""Captioning and grounding files for a scenes data directory (``write_scenes_refs``).

Input: ``scenes.json`` (``{"image_size", "scenes": [{"image", "mask"?, "objects": [{"id", "shape", "colour",
"size", "bbox" [x0, y0, x1, y1] (x1, y1 exclusive), "center"?, ...}]}]}``) and the images. Only those fields are
read; extra fields are ignored, and an optional per-object ``texture`` / ``pattern`` word is used in descriptions
when present. Candidate boxes come from the label masks (pixel value = object id) when the scene has a ``mask``
file, else from the objects' ``bbox``.

Written beside ``scenes.json``:

    caption_train.json         [{"image", "caption", "image_id"}]                 (Karpathy train format)
    caption_test.json          [{"image", "caption": [3 references]}]           (Karpathy test format)
    caption_test_gt.json       COCO caption references of the test images      (coco_karpathy_test_gt.json)
    grounding_test.json        [{"image", "text", "ref_id", "image_id", "bbox": [x, y, w, h],
                                 "candidates": [[x, y, w, h], ...], "width", "height"}]   (RefCOCO+-style)
    grounding_train.json       [{"image", "caption", "image_id"}]: the training images' referring expressions in
                               the retrieval format (no boxes), for ALBEF's weakly supervised fine-tuning (ITC + ITM)

The test split is the images of ``retrieval_test.json`` when it exists, else the last 10%. Referring expressions
name the target by the fewest attributes that single it out among size, pattern, colour, shape ("the small red
triangle"); when none does, by its relation to a uniquely named object ("the triangle left of the blue circle").
For the ``cells`` family (``"family": "cells"`` in scenes.json) captions and expressions are about the marked
objects only, the ones its questions are about (``scenes_cells.cell_captions`` / ``cell_expression``: "a striped
red thing and a checked blue thing", "the striped thing"): its plain objects, named by colour and shape, are
what the demo's model does not learn.
Everything is deterministic for a scenes directory (text choices are seeded by the image index).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .caption_formats import coco_references
from .formats import read_json, write_json
from .scenes_cells import cell_captions, cell_expression

ATTRS = ("size", "pattern", "colour", "shape")
Obj = Dict[str, Any]


def _pattern(o: Obj) -> Optional[str]:
    v = o.get("texture", o.get("pattern"))
    return v if isinstance(v, str) and v and v != "plain" else None


def _attr(o: Obj, a: str) -> Optional[str]:
    return _pattern(o) if a == "pattern" else (o.get(a) if isinstance(o.get(a), str) else None)


def describe(o: Obj, attrs: Sequence[str]) -> str:
    """The noun phrase of ``o`` with ``attrs`` (shape always last): "small striped red triangle"."""
    words = [_attr(o, a) for a in ATTRS if a in attrs and a != "shape"]
    return " ".join([w for w in words if w] + [o.get("shape", "object")])


def unique_phrase(o: Obj, objs: List[Obj]) -> Optional[str]:
    """The shortest attribute phrase true of ``o`` and of no other object, or None."""
    usable = [a for a in ATTRS if a != "shape" and _attr(o, a)]
    for n in range(len(usable) + 1):
        for combo in itertools.combinations(usable, n):
            key = lambda x: tuple(_attr(x, a) for a in combo) + (x.get("shape"),)  # noqa: E731
            if sum(key(x) == key(o) for x in objs) == 1:
                return describe(o, combo + ("shape",))
    return None


def _center(o: Obj) -> Tuple[float, float]:
    if isinstance(o.get("center"), list) and len(o["center"]) == 2:
        return float(o["center"][0]), float(o["center"][1])
    x0, y0, x1, y1 = o["bbox"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def referring_expression(o: Obj, objs: List[Obj], rng: np.random.Generator) -> Optional[str]:
    """A phrase that picks out ``o`` alone among ``objs`` (see the module docstring), or None."""
    p = unique_phrase(o, objs)
    if p is not None and rng.random() < 0.6:
        return "the " + p
    anchors = [(a, unique_phrase(a, objs)) for a in objs if a is not o]
    anchors = [(a, ap) for a, ap in anchors if ap is not None and abs(_center(a)[0] - _center(o)[0]) > 3]
    if anchors:
        a, ap = anchors[int(rng.integers(len(anchors)))]
        side = "left of" if _center(o)[0] < _center(a)[0] else "right of"
        base = describe(o, ("shape",))
        same = [x for x in objs if x.get("shape") == o.get("shape")
                and (_center(x)[0] < _center(a)[0]) == (_center(o)[0] < _center(a)[0]) and x is not a]
        if len(same) == 1:
            return f"the {base} {side} the {ap}"
    return None if p is None else "the " + p


def scene_captions(sc: Dict[str, Any], rng: np.random.Generator) -> List[str]:
    """Three reference captions of a scene, each naming specific objects (no generic template a blind captioner
    could match): a listing with sizes, a listing of two other objects by colour and shape, a left/right relation."""
    objs = list(sc["objects"])
    order = [objs[i] for i in rng.permutation(len(objs))]
    listing = ", ".join(an(describe(o, ("size", "colour", "shape"))) for o in order[:3])
    rest = order[3:5] if len(order) >= 5 else order[-2:]
    pair = " and ".join(an(describe(o, ("colour", "shape"))) for o in rest)
    xs = sorted(objs, key=lambda o: _center(o)[0])
    rel = (f"{an(describe(xs[0], ('colour', 'shape')))} left of {an(describe(xs[-1], ('colour', 'shape')))}"
           if len(objs) > 1 else listing)
    return [listing, pair, rel]


def an(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def object_boxes(sc: Dict[str, Any], root: Path) -> Dict[int, List[int]]:
    """{object id: [x, y, w, h]}: from the label mask when there is one, else from each object's bbox."""
    boxes: Dict[int, List[int]] = {}
    mask_path = sc.get("mask")
    if isinstance(mask_path, str) and (root / mask_path).is_file():
        from PIL import Image

        labels = np.asarray(Image.open(root / mask_path))
        for o in sc["objects"]:
            ys, xs = np.nonzero(labels == int(o["id"]))
            if len(xs):
                boxes[int(o["id"])] = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    for o in sc["objects"]:
        if int(o["id"]) not in boxes and isinstance(o.get("bbox"), list) and len(o["bbox"]) == 4:
            x0, y0, x1, y1 = (int(v) for v in o["bbox"])
            boxes[int(o["id"])] = [x0, y0, x1 - x0, y1 - y0]
    return boxes


def _test_images(root: Path, scenes: List[Dict[str, Any]]) -> set:
    ret = root / "retrieval_test.json"
    if ret.is_file():
        return {e["image"] for e in read_json(ret)}
    n_test = max(2, int(round(len(scenes) * 0.1)))
    return {sc["image"] for sc in scenes[-n_test:]}


def _size(sc: Dict[str, Any], root: Path, default: int) -> Tuple[int, int]:
    if isinstance(sc.get("width"), int) and isinstance(sc.get("height"), int):
        return sc["width"], sc["height"]
    if default:
        return default, default
    from PIL import Image

    with Image.open(root / sc["image"]) as im:
        return im.size


def write_scenes_refs(root: Union[str, Path], seed: int = 0) -> Dict[str, int]:
    """Write the caption and grounding files of the scenes directory ``root`` (see the module docstring); returns
    the number of entries per file."""
    root = Path(root)
    meta = read_json(root / "scenes.json")
    scenes = meta.get("scenes") if isinstance(meta, dict) else None
    if not isinstance(scenes, list) or not scenes:
        raise ValueError(f"{root / 'scenes.json'}: expected {{'scenes': [...]}} with at least one scene")
    for i, sc in enumerate(scenes):
        if not isinstance(sc, dict) or not isinstance(sc.get("image"), str) or not isinstance(sc.get("objects"), list):
            raise ValueError(f"{root / 'scenes.json'}: scene {i} needs 'image' and an 'objects' list")
    test = _test_images(root, scenes)
    S = int(meta.get("image_size") or 0)
    cells = meta.get("family") == "cells"  # captions and expressions about the marked objects (scenes_cells)
    grid = int(meta.get("grid") or 4)
    cap_train, cap_test, ground, ground_train = [], [], [], []

    def expression(o: Obj, objs: List[Obj], rng: np.random.Generator) -> Optional[str]:
        return cell_expression(o, objs) if cells else referring_expression(o, objs, rng)

    for i, sc in enumerate(scenes):
        rng = np.random.default_rng([seed, i, 23])
        objs = [o for o in sc["objects"] if isinstance(o, dict) and "id" in o and "shape" in o]
        if not objs:
            continue
        caps = (cell_captions(rng, sc, n=3, grid=grid) if cells else scene_captions({**sc, "objects": objs}, rng))
        if sc["image"] not in test:
            cap_train += [{"image": sc["image"], "caption": c, "image_id": i} for c in caps]
            exprs = [expression(o, objs, rng) for o in objs]
            ground_train += [{"image": sc["image"], "caption": x, "image_id": i} for x in exprs if x is not None]
            continue
        cap_test.append({"image": sc["image"], "caption": caps, "image_id": i})
        boxes = object_boxes({**sc, "objects": objs}, root)
        w, h = _size(sc, root, S)
        for o in objs:
            expr = expression(o, objs, rng)
            if expr is None or int(o["id"]) not in boxes:
                continue
            ground.append({"image": sc["image"], "text": expr, "ref_id": i * 100 + int(o["id"]), "image_id": i,
                           "bbox": boxes[int(o["id"])], "candidates": [boxes[k] for k in sorted(boxes)],
                           "width": w, "height": h})
    write_json(root / "caption_train.json", cap_train)
    write_json(root / "caption_test.json", cap_test)
    write_json(root / "caption_test_gt.json", coco_references(cap_test))
    write_json(root / "grounding_test.json", ground)
    write_json(root / "grounding_train.json", ground_train)
    return {"caption_train": len(cap_train), "caption_test": len(cap_test), "grounding_test": len(ground),
            "grounding_train": len(ground_train)}
