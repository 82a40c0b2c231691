"""``scenes``: built-in procedural image-text data, deterministic for a seed, in the field's formats.

Each image (``image_size`` px, default 64 = the ``small`` preset) shows ``min_objects``..``max_objects`` objects:
shapes {circle, square, triangle, diamond} x colours {red, green, blue, yellow, purple, orange} x sizes {small,
large}, placed without overlap on a textured, noisy background (stripes or checks, a tint, Gaussian noise).
Every scene has a *target* object and *distractors* that share its shape or its colour, so that a caption or a
question about one object can only be answered by looking at that object: text-guided selection matters.

That is the ``shapes`` family (the default). ``family="cells"`` draws the text-relevance benchmark instead: 10 or
more small objects on a jittered grid of cells, a few with a fine surface mark, questions of four types that each
need another object (``scenes_cells``; docs/data.md). Either way ``generate`` measures what it wrote (``scenes_card``)
and saves the data card as ``card.json``.

Written to ``out`` (see ``generate``):

    images/NNNNNN.png          the images
    masks/NNNNNN.png           per-object label maps: pixel value k = object id k (0 = background)
    scenes.json                per image: file, mask, background, objects [{id, shape, colour, size, center, bbox}]
    pretrain.json              [{"image", "caption"}]                           (train split, every caption)
    retrieval_train.json       [{"image", "caption", "image_id"}]
    retrieval_test.json        [{"image", "caption": [...]}]                    (test split)
    vqa_train.json / vqa_test.json   [{"question_id", "image", "question", "answer": [a], "type", "objects"}]
    answer_list.json           every VQA answer, sorted
    nlvr2_train.json / nlvr2_test.json   [{"images": [a, b], "sentence", "label", "type"}]  (one True, one False per pair)
    ve_train.json / ve_test.json         [{"image", "sentence", "label", "objects"}]  (one of each label per image)

``objects`` lists the ids (mask values) of the objects a question or statement is about, so that grounding (do
the kept tokens cover the right object?) can be measured. Image ``i`` depends only on ``(seed, i)``: asking for
more images never changes the first ones. The last ``test_fraction`` of the images form the test split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .formats import write_json
from .scenes_card import card, check_budget, covered_patches
from .scenes_cells import CELL_QUESTION_TYPES, cell_captions, cell_questions, render_cells
from .scenes_text import QUESTION_TYPES, answers_of, captions, nlvr2_statements, questions, ve_statements

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (230, 215, 40),
    "purple": (150, 60, 195),
    "orange": (245, 140, 25),
}
SIZES = {"small": 0.075, "large": 0.13}  # radius as a fraction of the image side
TEXTURES = ("striped", "checked", "plain")
FAMILIES = ("shapes", "cells")  # shapes: free placement, 3-6 objects; cells: see scenes_cells (the benchmark)
MAX_SEED = 2**31 - 1


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # apex up at cy - r, base at cy + 0.8 r, half-width r at the base
        t = (dy + r) / (1.8 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    raise ValueError(f"unknown shape {shape!r}; valid shapes: {list(SHAPES)}")


def _background(rng: np.random.Generator, S: int, xx: np.ndarray, yy: np.ndarray) -> Tuple[np.ndarray, str]:
    base = rng.uniform(35, 95) + rng.uniform(-12, 12, size=3)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    img = np.broadcast_to(base, (S, S, 3)).astype(np.float64)
    if texture == "striped":
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 12) * S / 64
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
        img = img + 14 * wave[..., None]
    elif texture == "checked":
        cell = int(rng.integers(4, 11)) * max(1, S // 64)
        img = img + 12 * ((((xx // cell) + (yy // cell)) % 2) * 2 - 1)[..., None]
    return img, texture


def _pick_objects(rng: np.random.Generator, n: int) -> List[Tuple[str, str, str]]:
    """(shape, colour, size) of the target, 1-2 distractors sharing its shape or colour, then random objects."""
    names = list(COLOURS)
    target = (SHAPES[rng.integers(4)], names[rng.integers(len(names))], ("small", "large")[rng.integers(2)])
    picked = [target]
    for _ in range(min(n - 1, int(rng.integers(1, 3)))):
        if rng.random() < 0.5:  # same shape, other colour
            others = [c for c in names if c != target[1]]
            picked.append((target[0], others[rng.integers(len(others))], ("small", "large")[rng.integers(2)]))
        else:  # same colour, other shape
            others = [s for s in SHAPES if s != target[0]]
            picked.append((others[rng.integers(len(others))], target[1], ("small", "large")[rng.integers(2)]))
    while len(picked) < n:
        picked.append((SHAPES[rng.integers(4)], names[rng.integers(len(names))], ("small", "large")[rng.integers(2)]))
    order = rng.permutation(len(picked))
    return [picked[i] for i in order]


def render_scene(rng: np.random.Generator, S: int, min_objects: int, max_objects: int, object_scale: float = 1.0):
    """One scene: pixels (S, S, 3) uint8, labels (S, S) uint8 (object id k, 0 = background), objects, texture.
    ``object_scale`` multiplies the object radii of ``SIZES``."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64) + 0.5
    img, texture = _background(rng, S, xx, yy)
    labels = np.zeros((S, S), dtype=np.uint8)
    objects: List[Dict[str, Any]] = []
    placed: List[Tuple[float, float, float]] = []
    for shape, colour, size in _pick_objects(rng, int(rng.integers(min_objects, max_objects + 1))):
        r = SIZES[size] * object_scale * S
        for _ in range(60):  # rejection sampling of a free position
            cx, cy = rng.uniform(r + 1, S - r - 1, size=2)
            if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr + 2) ** 2 for px, py, pr in placed):
                break
        else:
            continue  # no room left: the object is dropped (the metadata describes what was drawn)
        m = _shape_mask(shape, xx, yy, cx, cy, r)
        if not m.any():
            continue
        oid = len(objects) + 1
        rgb = np.clip(np.array(COLOURS[colour]) + rng.uniform(-15, 15, size=3), 0, 255)
        img[m] = rgb
        labels[m] = oid
        ys, xs = np.nonzero(m)
        placed.append((cx, cy, r))
        objects.append({
            "id": oid, "shape": shape, "colour": colour, "size": size,
            "center": [round(float(cx), 2), round(float(cy), 2)],
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
        })
    img = img + rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), labels, objects, texture


def question_types_of(family: str) -> tuple:
    """The VQA question types of a scenes family."""
    return CELL_QUESTION_TYPES if family == "cells" else QUESTION_TYPES


def _check_args(images: int, image_size: int, min_objects: int, max_objects: int, test_fraction: float,
                object_scale: float = 1.0, question_types=None, family: str = "shapes", grid: int = 4,
                seed: int = 0, patch_size: int = 8, card_keep: Optional[float] = None) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown scenes family {family!r}; valid families: {list(FAMILIES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if isinstance(images, bool) or not isinstance(images, int) or images < 4:
        raise ValueError(f"images must be an integer >= 4 (train and test splits of >= 2), got {images!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 32 <= image_size <= 1024:
        raise ValueError(f"image_size must be an integer in [32, 1024], got {image_size!r}")
    if family == "cells" and (isinstance(grid, bool) or not isinstance(grid, int) or not 2 <= grid <= 8
                              or image_size // grid < 12):
        raise ValueError(f"grid must be an integer in [2, 8] with cells of >= 12 px ({image_size} px images: "
                         f"grid <= {max(2, min(8, image_size // 12))}), got {grid!r}")
    top = grid * grid if family == "cells" else 8
    if not (isinstance(min_objects, int) and isinstance(max_objects, int) and 2 <= min_objects <= max_objects <= top):
        raise ValueError(f"need 2 <= min_objects <= max_objects <= {top} ({family} family), got {min_objects!r}, "
                         f"{max_objects!r}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or not 1 <= patch_size <= image_size:
        raise ValueError(f"patch_size must be an integer in [1, image_size={image_size}], got {patch_size!r}")
    if card_keep is not None:
        check_budget(max_objects, (image_size // patch_size) ** 2, card_keep, "data card: ")
    if not (isinstance(test_fraction, float) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if isinstance(object_scale, bool) or not isinstance(object_scale, (int, float)) or not 0.5 <= object_scale <= 2.0:
        raise ValueError(f"object_scale must be a number in [0.5, 2], got {object_scale!r}")
    if question_types is not None:
        valid = question_types_of(family)
        bad = [t for t in question_types if t not in valid]
        if bad or not question_types:
            raise ValueError(f"question_types must be a non-empty subset of {list(valid)} ({family} family), got "
                             f"{question_types!r}")


def generate(
    out: Union[str, Path],
    images: int = 2000,
    seed: int = 0,
    image_size: int = 64,
    min_objects: int = 3,
    max_objects: int = 6,
    test_fraction: float = 0.1,
    questions_per_image: int = 4,
    object_scale: float = 1.0,
    question_types: Optional[Sequence[str]] = None,
    family: str = "shapes",
    grid: int = 4,
    patch_size: int = 8,
    card_keep: Optional[float] = None,
) -> Dict[str, Any]:
    """Write the scenes dataset to ``out`` (created; existing files are overwritten). Returns a summary.

    ``object_scale`` scales every object's radius; ``question_types`` (default: all of ``QUESTION_TYPES``) limits
    the VQA questions to those kinds (e.g. ``("colour", "shape")``: questions about one named object).
    ``family`` "cells" draws the text-relevance benchmark of ``scenes_cells`` on a ``grid`` x ``grid`` array of
    cells (``object_scale`` is then unused). ``patch_size`` and ``card_keep`` only set the data card's
    objects-to-budget ratio (``card.json``, in the summary as ``card``; default keep 0.25); a ``card_keep`` given
    that keeps fewer tokens than ``max_objects`` is refused."""
    _check_args(images, image_size, min_objects, max_objects, test_fraction, object_scale, question_types, family,
                grid, seed, patch_size, card_keep)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    n_test = min(images - 2, max(2, int(round(images * test_fraction))))
    split = {"train": range(images - n_test), "test": range(images - n_test, images)}
    scenes, covered = [], []
    for i in range(images):
        rng = np.random.default_rng([seed, i])
        if family == "cells":
            pixels, labels, objects, texture = render_cells(rng, image_size, grid, min_objects, max_objects, _shape_mask)
        else:
            pixels, labels, objects, texture = render_scene(rng, image_size, min_objects, max_objects, object_scale)
        covered.append(covered_patches(labels, patch_size))
        name = f"{i:06d}.png"
        Image.fromarray(pixels, mode="RGB").save(out / "images" / name, compress_level=1)
        Image.fromarray(labels, mode="L").save(out / "masks" / name, compress_level=1)
        scenes.append({"image": f"images/{name}", "mask": f"masks/{name}", "background": texture, "objects": objects})
    write_json(out / "scenes.json", {"seed": seed, "image_size": image_size, "family": family,
                                     **({"grid": grid} if family == "cells" else {}), "scenes": scenes})
    files: Dict[str, List] = {}
    for part, idx in split.items():
        files.update(_annotations(part, [scenes[i] for i in idx], list(idx), seed, questions_per_image, image_size,
                                  question_types, family, grid))
    files["answer_list"] = answers_of(files["vqa_train"] + files["vqa_test"])
    for name, data in files.items():
        write_json(out / f"{name}.json", data)
    summary = {"out": str(out), "images": images, "train_images": len(split["train"]), "test_images": n_test,
               **{name: len(data) for name, data in files.items()}}
    summary["card"] = card(scenes, covered, files["vqa_train"] + files["vqa_test"], image_size, patch_size,
                           0.25 if card_keep is None else card_keep)
    summary["card"]["family"] = family
    write_json(out / "card.json", summary["card"])
    log.info("scenes: %s", summary)
    return summary


def _annotations(part: str, scenes: List[dict], ids: List[int], seed: int, n_q: int, S: int,
                 kinds: Optional[Sequence[str]] = None, family: str = "shapes", grid: int = 4) -> Dict[str, List]:
    """The annotation files of one split; text randomness is seeded per image (and per pair) as well."""
    pre, ret_train, ret_test, vqa, nlvr, ve = [], [], [], [], [], []
    for sc, i in zip(scenes, ids):
        rng = np.random.default_rng([seed, i, 1])
        caps = cell_captions(rng, sc, grid=grid) if family == "cells" else captions(rng, sc, S)
        if part == "train":
            pre += [{"image": sc["image"], "caption": c} for c in caps]
            ret_train += [{"image": sc["image"], "caption": c, "image_id": i} for c in caps]
        else:
            ret_test.append({"image": sc["image"], "caption": caps})
        qs = cell_questions(rng, sc, n_q, kinds, grid) if family == "cells" else questions(rng, sc, n_q, kinds)
        for k, q in enumerate(qs):
            vqa.append({"question_id": i * 100 + k, "image": sc["image"], **q})
        ve += [{"image": sc["image"], **s} for s in ve_statements(rng, sc)]
    n = len(scenes)
    for a in range(n if n > 1 else 0):
        rng = np.random.default_rng([seed, ids[a], 2])
        b = (a + 1 + int(rng.integers(n - 1))) % n
        for s in nlvr2_statements(rng, scenes[a], scenes[b]):
            nlvr.append({"images": [scenes[a]["image"], scenes[b]["image"]], **s})
    if part == "train":
        return {"pretrain": pre, "retrieval_train": ret_train, "vqa_train": vqa, "nlvr2_train": nlvr, "ve_train": ve}
    return {"retrieval_test": ret_test, "vqa_test": vqa, "nlvr2_test": nlvr, "ve_test": ve}
