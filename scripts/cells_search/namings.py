"""Experimental question sets for the cells family (monkeypatched into scenes_cells)."""
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
