"""Experimental question sets for the cells family (monkeypatched into scenes_cells). "colour" and "mark" were written for the first generator (questions without the grid argument) and no longer run; "mcount" runs on the current one."""
import vlprune.data.scenes_cells as sc
from vlprune.data.scenes_cells import PATTERNS, _pick, _fresh


def _uniq(objs):
    cols = [o["colour"] for o in objs]
    return [o for o in objs if cols.count(o["colour"]) == 1]


def q_pattern(rng, objs, used):
    named = _uniq(objs)
    if not named:
        return None
    want = _pick(rng, PATTERNS)
    cands = [o for o in named if o["pattern"] == want] or named
    o = _pick(rng, _fresh(cands, used))
    return f"what pattern is the {o['colour']} thing?", o["pattern"], [o["id"]]


def q_exists(rng, objs, used):
    cols = sorted({o["colour"] for o in objs})
    yes = rng.random() < 0.5
    opts = []
    for c in cols:
        have = {o["pattern"] for o in objs if o["colour"] == c}
        for p in PATTERNS:
            if (p in have) == yes and (yes or any(o["pattern"] == p for o in objs)):
                opts.append((c, p))
    if not opts:
        return None
    c, p = _pick(rng, opts)
    return f"is there a {p} {c} thing?", "yes" if yes else "no", [o["id"] for o in objs if o["colour"] == c]


def q_left(rng, objs, used):
    named = _fresh(_uniq(objs), used)
    pairs = [(a, b) for a in named for b in named if a["cell"][1] < b["cell"][1]]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    if rng.random() < 0.5:
        return f"is the {a['colour']} thing left of the {b['colour']} thing?", "yes", [a["id"], b["id"]]
    return f"is the {b['colour']} thing left of the {a['colour']} thing?", "no", [b["id"], a["id"]]


def install(naming, amp):
    sc.PATTERN_AMP = amp
    if naming == "colour":
        sc.CELL_MAKERS.update({"pattern": q_pattern, "exists": q_exists, "left": q_left})


# -- "mark" naming: a few objects carry a fine mark (a pattern unique in the scene), the rest are plain; questions
# name an object by its mark alone (one attribute, a detail that a smaller image loses)
MARKS = ("striped", "checked")


def objects_mark(rng, n):
    colours = sc._colour_groups(rng, n)
    pats = ["plain"] * n
    idx = rng.permutation(n)
    for k, p in enumerate(MARKS):
        if rng.random() < MARK_P:
            pats[int(idx[k])] = p
    return [(_pick(rng, sc.CELL_SHAPES), c, _pick(rng, ("small", "large")), p) for c, p in zip(colours, pats)]


def m_colour(rng, objs, used):
    marked = [o for o in objs if o["pattern"] != "plain"]
    if not marked:
        return None
    o = _pick(rng, _fresh(marked, used))
    return f"what colour is the {o['pattern']} thing?", o["colour"], [o["id"]]


def m_exists(rng, objs, used):
    p = _pick(rng, MARKS)
    ids = [o["id"] for o in objs if o["pattern"] == p]
    return f"is there a {p} thing?", "yes" if ids else "no", ids or [o["id"] for o in objs]


def m_side(rng, objs, used):
    marked = [o for o in objs if o["pattern"] != "plain"]
    if not marked:
        return None
    o = _pick(rng, _fresh(marked, used))
    g = max(x["cell"][1] for x in objs) + 1
    return f"is the {o['pattern']} thing on the left or the right?", "left" if o["center"][0] < 48 else "right", [o["id"]]


MARK_P = 0.75


def install(naming, amp):  # noqa: F811
    sc.PATTERN_AMP = amp
    if naming == "colour":
        sc.CELL_MAKERS.update({"pattern": q_pattern, "exists": q_exists, "left": q_left})
    if naming == "mark":
        sc.cell_objects = objects_mark
        sc.CELL_MAKERS.update({"pattern": m_colour, "exists": m_exists, "left": m_side})


def v2_count(rng, objs, used, grid):
    """"how many marked things are there?" (0 / 1 / 2), on the generator's own scenes."""
    ids = [o["id"] for o in objs if o["pattern"] != "plain"]
    return "how many marked things are there?", str(len(ids)), ids


_install = install


def install(naming, amp):  # noqa: F811
    _install(naming, amp)
    if naming == "mcount":
        sc.CELL_MAKERS.update({"count": v2_count})
