"""The ``cells`` family of the scenes data: a benchmark where the question decides which patches matter.

Each image is cut into a ``grid`` x ``grid`` array of cells (4 x 4 at 96 px: 24 px cells, 3 x 3 patches of 8 px);
``min_objects``..``max_objects`` cells hold one object each, jittered inside its cell so that objects never
overlap. An object has a shape {circle, square, triangle, diamond}, a colour (6) and a size {small, large}. Most
objects are plain; each of the two ``MARKS`` (1-pixel stripes, 1-pixel checks of +-``PATTERN_AMP`` around the
object's colour) is drawn on one object of the scene with probability ``MARK_P``. A mark keeps the object's mean
colour, so it vanishes when the image is shrunk (``lowres``) and can only be read from full-resolution patches
of that object: the marked object is the one among 10 or more that the question points at.

The questions (``CELL_QUESTION_TYPES``), each about other objects of the image where it can:

    colour    "what colour is the striped thing?"                the marked object's colour (6 answers)
    exists    "is there a checked thing?"                        yes / no
    count     "how many marked things are there?"                0 / 1 / 2 (the marked objects)
    side      "is the checked thing on the left or the right?"   left / right (its column, in the left or right
                                                                 half of the grid)

Every marked object has plain distractors of its colour or its shape. Why this design (and not objects named by
colour and shape, or "how many red things"): trained from scratch, the demo's model learns questions that find
an object by one visible attribute; colour-and-shape naming and counting colours stayed at the answer prior in
every recipe tried (docs/benchmark_scenes.md).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .scenes_text import SHAPES as CELL_SHAPES
from .scenes_text import _pick
# colours kept inside [40, 215] so that a pattern of +-PATTERN_AMP is not clipped (it keeps the mean colour)
CELL_COLOURS = {
    "red": (205, 45, 45),
    "green": (50, 170, 60),
    "blue": (50, 85, 210),
    "yellow": (210, 200, 50),
    "purple": (150, 65, 190),
    "orange": (212, 130, 40),
}
MARKS = ("striped", "checked")
PATTERNS = ("plain",) + MARKS
PATTERN_AMP = 38.0
MARK_P = 0.6  # the chance that a scene has a given mark (on one object)
CELL_SIZES = {"small": 0.30, "large": 0.42}  # radius as a fraction of the cell side
CELL_QUESTION_TYPES = ("colour", "exists", "count", "side")
Obj = Dict[str, Any]


def _colour_groups(rng: np.random.Generator, n: int) -> List[str]:
    """``n`` colour names in groups of 1-3 of one colour (so that "how many X things" has answers 1, 2 and 3)."""
    names = [str(c) for c in rng.permutation(list(CELL_COLOURS))]
    out: List[str] = []
    for c in names:
        out += [c] * int(rng.integers(1, 4))
        if len(out) >= n:
            break
    while len(out) < n:  # six groups were not enough: top up with colours that have fewer than 3
        c = _pick(rng, [c for c in names if out.count(c) < 3])
        out.append(c)
    return out[:n]


def cell_objects(rng: np.random.Generator, n: int) -> List[Tuple[str, str, str, str]]:
    """(shape, colour, size, pattern) of ``n`` objects: colours in groups of 1-3; each mark on at most one object
    (with probability ``MARK_P``), the others plain."""
    colours = _colour_groups(rng, n)
    shapes = [_pick(rng, CELL_SHAPES) for _ in range(n)]
    sizes = [_pick(rng, ("small", "large")) for _ in range(n)]
    pats = ["plain"] * n
    order = rng.permutation(n)
    for k, mark in enumerate(MARKS):
        if rng.random() < MARK_P:
            pats[int(order[k])] = mark
    return list(zip(shapes, colours, sizes, pats))


def pattern_offset(pattern: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """The brightness offset of a pattern at integer pixel coordinates: 1-px horizontal stripes or checks."""
    if pattern == "plain":
        return np.zeros_like(xx, dtype=np.float64)
    if pattern == "striped":
        return PATTERN_AMP * (2.0 * (yy.astype(np.int64) % 2) - 1.0)
    if pattern == "checked":
        return PATTERN_AMP * (2.0 * ((xx.astype(np.int64) + yy.astype(np.int64)) % 2) - 1.0)
    raise ValueError(f"unknown pattern {pattern!r}; valid patterns: {list(PATTERNS)}")


def render_cells(rng: np.random.Generator, S: int, grid: int, min_objects: int, max_objects: int, shape_mask):
    """One scene: pixels (S, S, 3) uint8, labels (S, S) uint8 (object id k, 0 = background), objects, background."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64) + 0.5
    iy, ix = np.mgrid[0:S, 0:S]
    base = rng.uniform(70, 110) + rng.uniform(-10, 10, size=3)
    img = np.broadcast_to(base, (S, S, 3)).astype(np.float64).copy()
    labels = np.zeros((S, S), dtype=np.uint8)
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.permutation(grid * grid)[:n]
    cell = S / grid
    objects: List[Obj] = []
    for (shape, colour, size, pattern), c in zip(cell_objects(rng, n), cells):
        r = CELL_SIZES[size] * cell
        slack = max(0.0, cell / 2 - r - 1)
        row, col = divmod(int(c), grid)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        m = shape_mask(shape, xx, yy, cx, cy, r) & (labels == 0)
        if not m.any():
            continue
        oid = len(objects) + 1
        rgb = np.array(CELL_COLOURS[colour], dtype=np.float64) + rng.uniform(-8, 8, size=3)
        img[m] = rgb + pattern_offset(pattern, ix[m], iy[m])[:, None]
        labels[m] = oid
        ys, xs = np.nonzero(m)
        objects.append({
            "id": oid, "shape": shape, "colour": colour, "size": size, "pattern": pattern,
            "cell": [row, col], "center": [round(float(cx), 2), round(float(cy), 2)],
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
        })
    img = img + rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), labels, objects, "plain"


# -- questions ---------------------------------------------------------------------------------------------------
def _marked(objs: List[Obj]) -> List[Obj]:
    return [o for o in objs if o["pattern"] in MARKS]


def _fresh(cands: List[Obj], used: set) -> List[Obj]:
    """Prefer objects no earlier question of the image was about."""
    new = [o for o in cands if o["id"] not in used]
    return new or cands


def _q_colour(rng, objs: List[Obj], used: set, grid: int):
    marked = _marked(objs)
    if not marked:
        return None
    o = _pick(rng, _fresh(marked, used))
    return f"what colour is the {o['pattern']} thing?", o["colour"], [o["id"]]


def _q_exists(rng, objs: List[Obj], used: set, grid: int):
    have = {o["pattern"]: o for o in _marked(objs)}
    yes = rng.random() < 0.5  # balanced answers: the answer first, then a mark that gives it
    cands = [m for m in MARKS if (m in have) == yes]
    if not cands:
        return None
    m = _pick(rng, cands)
    return f"is there a {m} thing?", "yes" if yes else "no", [have[m]["id"]] if yes else []


def _q_count(rng, objs: List[Obj], used: set, grid: int):
    ids = [o["id"] for o in _marked(objs)]
    return "how many marked things are there?", str(len(ids)), ids


def side_of(o: Obj, grid: int) -> Optional[str]:
    """"left" / "right": the half of the grid the object's column is in (None: the middle column of an odd grid)."""
    col = o["cell"][1]
    if 2 * col + 1 == grid:
        return None
    return "left" if 2 * col + 1 < grid else "right"


def _q_side(rng, objs: List[Obj], used: set, grid: int):
    marked = [o for o in _marked(objs) if side_of(o, grid) is not None]
    if not marked:
        return None
    o = _pick(rng, _fresh(marked, used))
    return f"is the {o['pattern']} thing on the left or the right?", side_of(o, grid), [o["id"]]


CELL_MAKERS = {"colour": _q_colour, "exists": _q_exists, "count": _q_count, "side": _q_side}


def cell_questions(rng: np.random.Generator, scene: Dict[str, Any], n: int,
                   kinds: Optional[Sequence[str]] = None, grid: int = 4) -> List[Dict[str, Any]]:
    """Up to ``n`` questions about one cells scene, the types in turn (a random order per round), each about
    objects earlier questions of the image were not about, where the image allows."""
    objs = scene["objects"]
    names = [k for k in CELL_QUESTION_TYPES if kinds is None or k in kinds]
    out: List[Dict[str, Any]] = []
    seen: set = set()
    used: set = set()
    order: List[str] = []
    for k in range(3 * max(n, len(names))):
        if len(out) == n:
            break
        if k % len(names) == 0:
            order = [names[i] for i in rng.permutation(len(names))]
        kind = order[k % len(names)]
        made = CELL_MAKERS[kind](rng, objs, used, grid)
        if made is None or made[0] in seen:
            continue
        seen.add(made[0])
        used.update(made[2])
        out.append({"question": made[0], "answer": [made[1]], "type": kind, "objects": made[2]})
    return out


def cell_answer(question: str, objs: List[Obj], grid: int = 4) -> str:
    """Re-derive a cells question's answer from an object list alone (the tests' reference)."""
    words = question.rstrip("?").split()
    if question.startswith("what colour is the "):
        return next(o["colour"] for o in objs if o["pattern"] == words[4])
    if question.startswith("is there a "):
        return "yes" if any(o["pattern"] == words[3] for o in objs) else "no"
    if question == "how many marked things are there?":
        return str(sum(o["pattern"] in MARKS for o in objs))
    if question.startswith("is the "):
        o = next(o for o in objs if o["pattern"] == words[2])
        return "left" if 2 * o["cell"][1] + 1 < grid else "right"
    raise ValueError(f"not a cells question: {question!r}")


# -- captions and referring expressions --------------------------------------------------------------------------
COUNT_WORDS = ("no", "one", "two")


def cell_captions(rng: np.random.Generator, scene: Dict[str, Any], n: int = 2, grid: int = 4) -> List[str]:
    """``n`` captions of different templates about the scene's marked objects, the ones its questions are about:
    "a striped red thing and a checked blue thing", "two marked things, a striped red one and a checked blue one",
    "a striped red thing on the left". A scene without a marked object gets "only plain shapes, none of them
    marked" and "no marked things, only plain shapes". Colour-and-shape descriptions of the plain objects are left out:
    the demo's model does not learn to bind colour and shape (docs/benchmark_scenes.md)."""
    marked = _marked(scene["objects"])
    order = [marked[i] for i in rng.permutation(len(marked))]
    if not order:
        return ["only plain shapes, none of them marked", "no marked things, only plain shapes"][:n]

    def listing() -> str:
        return " and ".join(f"a {o['pattern']} {o['colour']} thing" for o in order)

    def counted() -> str:
        return (f"{COUNT_WORDS[len(order)]} marked thing{'s' if len(order) > 1 else ''}, "
                + " and ".join(f"a {o['pattern']} {o['colour']} one" for o in order))

    def sided() -> str:
        return " and ".join(f"a {o['pattern']} {o['colour']} thing" + (f" on the {side_of(o, grid)}"
                                                                       if side_of(o, grid) else "") for o in order)

    out: List[str] = []
    for k in rng.permutation(3):
        c = (listing, counted, sided)[int(k)]()
        if c not in out:
            out.append(c)
        if len(out) == n:
            break
    return out


def cell_expression(o: Obj, objs: List[Obj]) -> Optional[str]:
    """The referring expression of a marked object ("the striped thing": one object per mark), None for a plain
    one (named by colour and shape, which the demo's model does not learn)."""
    if o.get("pattern") not in MARKS or sum(x.get("pattern") == o["pattern"] for x in objs) != 1:
        return None
    return f"the {o['pattern']} thing"
