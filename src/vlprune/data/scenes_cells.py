"""The ``cells`` family of the scenes data: a benchmark where the question decides which patches matter.

Each image is cut into a ``grid`` x ``grid`` array of cells (4 x 4 at 96 px: 24 px cells, 3 x 3 patches of 8 px);
``min_objects``..``max_objects`` cells hold one object each, jittered inside its cell so that objects never
overlap. An object has a shape {circle, square, triangle, diamond}, a colour (6), a size {small, large} and a fine
surface ``pattern`` {plain, striped, checked}: 1-pixel stripes or checks of +-``PATTERN_AMP`` around the object's
colour. A pattern keeps the object's mean colour, so it vanishes when the image is shrunk (``lowres``) and can
only be read from full-resolution patches of that object.

The scene is drawn so that every question type has a different object to be about and balanced answers:
colours come in groups of 1-3 objects (counting), the asked-about object has distractors that share its colour
or its shape, and patterns are uniform. The questions (``CELL_QUESTION_TYPES``):

    pattern   "what pattern is the red square?"                  plain / striped / checked
    exists    "is there a blue circle?"                          yes / no (for "no", that colour and that shape
                                                                 are both in the image, on other objects)
    count     "how many green things are there?"                 1 / 2 / 3
    left      "is the red square left of the blue circle?"       yes / no (the two are in different columns)

An object is named by colour and shape, and only when that pair is unique in the image.
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
PATTERNS = ("plain", "striped", "checked")
PATTERN_AMP = 38.0
CELL_SIZES = {"small": 0.30, "large": 0.42}  # radius as a fraction of the cell side
CELL_QUESTION_TYPES = ("pattern", "exists", "count", "left")
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
    """(shape, colour, size, pattern) of ``n`` objects: colours in groups of 1-3, the rest uniform."""
    colours = _colour_groups(rng, n)
    return [(_pick(rng, CELL_SHAPES), c, _pick(rng, ("small", "large")), _pick(rng, PATTERNS)) for c in colours]


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
def name(o: Obj) -> str:
    return f"{o['colour']} {o['shape']}"


def _named(objs: List[Obj]) -> List[Obj]:
    """The objects that "the <colour> <shape>" names unambiguously."""
    keys = [(o["colour"], o["shape"]) for o in objs]
    return [o for o, k in zip(objs, keys) if keys.count(k) == 1]


def _fresh(cands: List[Obj], used: set) -> List[Obj]:
    """Prefer objects no earlier question of the image was about."""
    new = [o for o in cands if o["id"] not in used]
    return new or cands


def _q_pattern(rng, objs: List[Obj], used: set):
    named = _named(objs)
    if not named:
        return None
    want = _pick(rng, PATTERNS)  # balanced answers: the pattern first, then an object that has it
    cands = [o for o in named if o["pattern"] == want] or named
    o = _pick(rng, _fresh(cands, used))
    return f"what pattern is the {name(o)}?", o["pattern"], [o["id"]]


def _q_exists(rng, objs: List[Obj], used: set):
    pairs = {(o["colour"], o["shape"]) for o in objs}
    if rng.random() < 0.5:
        o = _pick(rng, _fresh(objs, used))
        ids = [p["id"] for p in objs if (p["colour"], p["shape"]) == (o["colour"], o["shape"])]
        return f"is there a {name(o)}?", "yes", ids
    colours = sorted({o["colour"] for o in objs})
    shapes = sorted({o["shape"] for o in objs})
    absent = [(c, s) for c in colours for s in shapes if (c, s) not in pairs]
    if not absent:
        return None
    c, s = _pick(rng, absent)  # both words occur in the image, on other objects: those must be looked at
    return f"is there a {c} {s}?", "no", [p["id"] for p in objs if p["colour"] == c or p["shape"] == s]


def _q_count(rng, objs: List[Obj], used: set):
    by = {}
    for o in objs:
        by.setdefault(o["colour"], []).append(o["id"])
    counts = sorted({len(v) for v in by.values()})
    want = _pick(rng, (1, 2, 3))
    k = want if want in counts else _pick(rng, counts)
    cs = [c for c, v in sorted(by.items()) if len(v) == k]
    cs = [c for c in cs if not set(by[c]) <= used] or cs
    c = _pick(rng, cs)
    return f"how many {c} things are there?", str(k), by[c]


def _q_left(rng, objs: List[Obj], used: set):
    named = _fresh(_named(objs), used)
    pairs = [(a, b) for a in named for b in named if a["cell"][1] < b["cell"][1]]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)  # a is in a column left of b's
    if rng.random() < 0.5:
        return f"is the {name(a)} left of the {name(b)}?", "yes", [a["id"], b["id"]]
    return f"is the {name(b)} left of the {name(a)}?", "no", [b["id"], a["id"]]


CELL_MAKERS = {"pattern": _q_pattern, "exists": _q_exists, "count": _q_count, "left": _q_left}


def cell_questions(rng: np.random.Generator, scene: Dict[str, Any], n: int,
                   kinds: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
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
        made = CELL_MAKERS[kind](rng, objs, used)
        if made is None or made[0] in seen:
            continue
        seen.add(made[0])
        used.update(made[2])
        out.append({"question": made[0], "answer": [made[1]], "type": kind, "objects": made[2]})
    return out


def cell_answer(question: str, objs: List[Obj]) -> str:
    """Re-derive a cells question's answer from an object list alone (the tests' reference)."""
    words = question.rstrip("?").split()
    if question.startswith("what pattern is the "):
        c, s = words[-2:]
        return next(o["pattern"] for o in objs if (o["colour"], o["shape"]) == (c, s))
    if question.startswith("is there a "):
        c, s = words[-2:]
        return "yes" if any((o["colour"], o["shape"]) == (c, s) for o in objs) else "no"
    if question.startswith("how many "):
        return str(sum(o["colour"] == words[2] for o in objs))
    if question.startswith("is the "):
        a = next(o for o in objs if (o["colour"], o["shape"]) == (words[2], words[3]))
        b = next(o for o in objs if (o["colour"], o["shape"]) == (words[-2], words[-1]))
        return "yes" if a["cell"][1] < b["cell"][1] else "no"
    raise ValueError(f"not a cells question: {question!r}")
