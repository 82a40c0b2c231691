"""The language of the scenes data: captions, VQA questions, NLVR2 and SNLI-VE statements, all computed from a
scene's object list (so every answer and label is true by construction, and tests can re-derive them).

Referring expressions are unambiguous: "the triangle" is only used when the scene has one triangle, "the red
thing" only when one object is red, and so on. Every question/statement lists the ids of the objects it is
about (``objects``) for grounding measurements.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen")
MATERIALS = ("wood", "metal", "glass", "paper", "plastic")
PROPERTIES = ("heavy", "warm", "new", "expensive", "old", "wet")
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
QUESTION_TYPES = ("colour", "shape", "exists", "count", "left")
Obj = Dict[str, Any]


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def an(words: str) -> str:
    """``words`` with its indefinite article: "a red circle", "an orange square"."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def phrase(o: Obj, size: bool = False) -> str:
    return f"{o['size']} {o['colour']} {o['shape']}" if size else f"{o['colour']} {o['shape']}"


def where(o: Obj, S: float) -> str:
    x, y = o["center"]
    col = "left" if x < S / 3 else ("right" if x > 2 * S / 3 else "")
    row = "top" if y < S / 3 else ("bottom" if y > 2 * S / 3 else "")
    return (f"{row} {col}".strip()) or "middle"


def _unique(objs: List[Obj], key: Callable[[Obj], Any]) -> List[Obj]:
    vals = [key(o) for o in objs]
    return [o for o, v in zip(objs, vals) if vals.count(v) == 1]


def _left_pair(rng, objs: List[Obj]) -> Optional[Tuple[Obj, Obj]]:
    """Two objects with unique colour+shape whose x centres differ by > 3 px: (left one, right one)."""
    named = _unique(objs, lambda o: (o["colour"], o["shape"]))
    pairs = [(a, b) for a in named for b in named if b["center"][0] - a["center"][0] > 3]
    return None if not pairs else pairs[int(rng.integers(len(pairs)))]


# -- captions ----------------------------------------------------------------------------------------------------
def captions(rng: np.random.Generator, scene: Dict[str, Any], S: int, n: int = 2) -> List[str]:
    """``n`` captions of different templates describing specific objects of a scene of side ``S`` px."""
    objs = scene["objects"]

    def relation() -> Optional[str]:
        p = _left_pair(rng, objs)
        if p is None:
            return None
        a, b = p
        return f"{an(phrase(a, rng.random() < 0.5))} to the left of {an(phrase(b, rng.random() < 0.5))}"

    def listing() -> str:
        k = min(3, len(objs))
        sel = [objs[i] for i in rng.permutation(len(objs))[:k]]
        parts = [f"{an(phrase(o, rng.random() < 0.5))}" for o in sel]
        return ", ".join(parts[:-1]) + " and " + parts[-1]

    def position() -> str:
        o = _pick(rng, objs)
        return f"{an(phrase(o, True))} in the {where(o, S)} of the picture"

    def count() -> str:
        o = _pick(rng, objs)
        return f"{NUMBERS[len(objs)]} shapes on a {scene['background']} background, one of them {an(phrase(o))}"

    out: List[str] = []
    for k in rng.permutation(4):
        c = (relation, listing, position, count)[int(k)]()
        if c is not None and c not in out:
            out.append(c)
        if len(out) == n:
            break
    return out


# -- VQA ---------------------------------------------------------------------------------------------------------
def questions(rng: np.random.Generator, scene: Dict[str, Any], n: int,
              kinds: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Up to ``n`` questions of different types (``kinds``, default all of ``QUESTION_TYPES``) about specific
    objects: {question, answer: [a], type, objects}."""
    objs = scene["objects"]

    def colour():
        cands = _unique(objs, lambda o: o["shape"])
        if cands:
            o = _pick(rng, cands)
            return f"what colour is the {o['shape']}?", o["colour"], [o["id"]]
        cands = _unique(objs, lambda o: (o["size"], o["shape"]))
        if not cands:
            return None
        o = _pick(rng, cands)
        return f"what colour is the {o['size']} {o['shape']}?", o["colour"], [o["id"]]

    def shape():
        cands = _unique(objs, lambda o: o["colour"])
        if not cands:
            return None
        o = _pick(rng, cands)
        return f"what shape is the {o['colour']} thing?", o["shape"], [o["id"]]

    def exists():
        if rng.random() < 0.5:
            o = _pick(rng, objs)
            ids = [p["id"] for p in objs if (p["colour"], p["shape"]) == (o["colour"], o["shape"])]
            return f"is there {an(phrase(o))}?", "yes", ids
        o = _pick(rng, objs)  # ask about o's shape in a colour it does not have here: look at the shape's objects
        have = {p["colour"] for p in objs if p["shape"] == o["shape"]}
        c = _pick(rng, [c for c in COLOURS if c not in have])
        return f"is there {an(c)} {o['shape']}?", "no", [p["id"] for p in objs if p["shape"] == o["shape"]]

    def count():
        if rng.random() < 0.5:
            c = _pick(rng, COLOURS) if rng.random() < 0.2 else _pick(rng, objs)["colour"]
            ids = [o["id"] for o in objs if o["colour"] == c]
            return f"how many {c} things are there?", str(len(ids)), ids
        s = _pick(rng, SHAPES) if rng.random() < 0.2 else _pick(rng, objs)["shape"]
        ids = [o["id"] for o in objs if o["shape"] == s]
        return f"how many {s}s are there?", str(len(ids)), ids

    def left():
        p = _left_pair(rng, objs)
        if p is None:
            return None
        a, b = p if rng.random() < 0.5 else (p[1], p[0])
        answer = phrase(p[0])
        return f"which is further left, the {phrase(a)} or the {phrase(b)}?", answer, [a["id"], b["id"]]

    makers = {"colour": colour, "shape": shape, "exists": exists, "count": count, "left": left}
    names = [k for k in makers if kinds is None or k in kinds]
    out, seen = [], set()
    for k in range(3 * len(names)):
        if len(out) == n:
            break
        if k % len(names) == 0:
            order = [names[i] for i in rng.permutation(len(names))]
        kind = order[k % len(names)]
        made = makers[kind]()
        if made is None or made[0] in seen:
            continue
        seen.add(made[0])
        out.append({"question": made[0], "answer": [made[1]], "type": kind, "objects": made[2]})
    return out


def answers_of(vqa: List[Dict[str, Any]]) -> List[str]:
    return sorted({a for q in vqa for a in q.get("answer", [])})


# -- SNLI-VE -----------------------------------------------------------------------------------------------------
def ve_statements(rng: np.random.Generator, scene: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One entailment, one neutral, one contradiction statement about specific objects of the scene."""
    objs = scene["objects"]
    uniq = _unique(objs, lambda o: o["shape"])
    pair = _left_pair(rng, objs)
    o = _pick(rng, objs)
    have = {p["colour"] for p in objs if p["shape"] == o["shape"]}
    missing = [c for c in COLOURS if c not in have]  # empty when the shape comes in every colour (cells family)
    same_shape = [p["id"] for p in objs if p["shape"] == o["shape"]]
    ent = [(f"there is {an(phrase(o))}.", [o["id"]]), (f"there are {NUMBERS[len(objs)]} objects.", [p["id"] for p in objs])]
    con = [(f"there are {NUMBERS[len(objs) + 1]} objects.", [p["id"] for p in objs])]
    if missing:
        con.insert(0, (f"there is {an(_pick(rng, missing))} {o['shape']}.", same_shape))
    if uniq:
        u = _pick(rng, uniq)
        wrong = _pick(rng, [c for c in COLOURS if c != u["colour"]])
        ent.append((f"the {u['shape']} is {u['colour']}.", [u["id"]]))
        con.append((f"the {u['shape']} is {wrong}.", [u["id"]]))
    if pair is not None:
        a, b = pair
        ent.append((f"the {phrase(a)} is left of the {phrase(b)}.", [a["id"], b["id"]]))
        con.append((f"the {phrase(a)} is right of the {phrase(b)}.", [a["id"], b["id"]]))
    n = _pick(rng, objs)
    neu = [(f"the {phrase(n)} is made of {_pick(rng, MATERIALS)}.", [n["id"]]),
           (f"the {phrase(n)} is {_pick(rng, PROPERTIES)}.", [n["id"]]),
           (f"someone painted the {phrase(n)} yesterday.", [n["id"]])]
    out = []
    for label, opts in (("entailment", ent), ("neutral", neu), ("contradiction", con)):
        s, ids = opts[int(rng.integers(len(opts)))]
        out.append({"sentence": s, "label": label, "objects": ids})
    return out


# -- NLVR2 -------------------------------------------------------------------------------------------------------
def nlvr2_statements(rng: np.random.Generator, left: Dict[str, Any], right: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One True and one False statement about the pair (left image, right image)."""
    L, R = left["objects"], right["objects"]
    both = L + R

    def n_of(objs, key, v):
        return sum(o[key] == v for o in objs)

    def contains():
        o = _pick(rng, both) if rng.random() < 0.7 else {"colour": _pick(rng, COLOURS), "shape": _pick(rng, SHAPES)}
        side, objs = (("left", L), ("right", R))[int(rng.integers(2))]
        truth = any((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in objs)
        return f"the {side} image contains {an(phrase(o))}", truth, "contains"

    def both_have():
        if rng.random() < 0.5:
            c = _pick(rng, both)["colour"]
            return f"both images contain {an(c)} object", n_of(L, "colour", c) > 0 and n_of(R, "colour", c) > 0, "both"
        s = _pick(rng, both)["shape"]
        return f"both images contain {an(s)}", n_of(L, "shape", s) > 0 and n_of(R, "shape", s) > 0, "both"

    def more():
        s = _pick(rng, both)["shape"]
        return f"the left image has more {s}s than the right image", n_of(L, "shape", s) > n_of(R, "shape", s), "more"

    def exactly():
        s = _pick(rng, both)["shape"]
        side, objs = (("left", L), ("right", R))[int(rng.integers(2))]
        k = max(0, n_of(objs, "shape", s) + int(rng.integers(-1, 2)))
        return f"the {side} image contains exactly {NUMBERS[k]} {s}{'' if k == 1 else 's'}", n_of(objs, "shape", s) == k, "exactly"

    makers = (contains, both_have, more, exactly)
    out = []
    for want in (True, False):
        for _ in range(60):
            s, truth, kind = makers[int(rng.integers(len(makers)))]()
            if truth == want and all(s != o["sentence"] for o in out):
                out.append({"sentence": s, "label": "True" if want else "False", "type": kind})
                break
    return out
