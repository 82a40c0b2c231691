"""One paragraph per protocol, generated from the numbers: what the paper claims, what this run measured,
whether it held, and under which conditions it did not. A claim "held" when the measured difference points the
claimed way and, where an interval exists, the interval does not exclude the claim; rows whose validation curve
did not level off make the verdict conditional on the budget.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

Tables = Dict[str, List[Dict[str, Any]]]


def _row(rows: List[Dict[str, Any]], label: str) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if r["label"] == label), None)


def _vs(a: Dict[str, Any], b: Dict[str, Any], n_boot: int) -> Dict[str, Any]:
    from .summary import paired

    return paired(a, b, n_boot)


def _say(d: Dict[str, Any], unit: str) -> str:
    s = f"{d['diff']:+.1f} {unit}"
    if d["low"] is not None:
        s += f" (95% interval {d['low']:+.1f} to {d['high']:+.1f}"
        s += f", p = {d['p']:.3f})" if d["p"] is not None else ")"
    else:
        s += " (one seed: no interval)"
    return s


def not_worse(d: Dict[str, Any]) -> bool:
    """The difference is not significantly below zero (its interval reaches 0, or it is >= 0 without one)."""
    return d["diff"] >= 0 if d["low"] is None else d["high"] >= 0


def better(d: Dict[str, Any]) -> bool:
    """The difference is above zero, significantly so where an interval exists."""
    return d["diff"] > 0 if d["low"] is None else d["low"] > 0


def _budget(tables: Tables) -> str:
    bad = [f"{t}: {r['label']}" for t, rows in tables.items() for r in rows if r["converged"] is False]
    unknown = [r for rows in tables.values() for r in rows if r["converged"] is None]
    if bad:
        return (f" Not converged (validation still rising at the end): {'; '.join(bad)}; these comparisons reflect "
                "the step budget as much as the methods.")
    if unknown:
        return " Convergence could not be checked (fewer than 3 validation points)."
    return " Every row's validation curve levelled off."


def _held(ok: bool) -> str:
    return "The claim held in this run." if ok else "The claim did not hold in this run."


def _pretrain_2x2(m: str, title: str, claim: str, tables: Tables, speed, prof) -> str:
    n = prof.n_boot
    base, own = speed[0], speed[1]
    parts = [f"{title} claims {claim}."]
    sp = own["speedup"]
    time_ratio = own["train_seconds"] / base["train_seconds"] if base["train_seconds"] else None
    mem = (own["saved_mib"] / base["saved_mib"]) if base["saved_mib"] and own["saved_mib"] else None
    parts.append(f"Measured (wall-clock on the machine and threads under Run): pre-training with {m} ran at "
                 f"{own['samples_per_s']:.1f} samples/s against {base['samples_per_s']:.1f} unpruned (x{sp:.2f}), "
                 + (f"wall time x{time_ratio:.2f}, " if time_ratio else "")
                 + (f"memory saved for backward x{mem:.2f}." if mem else "no memory figure."))
    ok = bool(sp and sp > 1.0)
    for table, unit in (("vqa", "points of VQA accuracy"), ("retrieval", "r_mean")):
        rows = tables.get(table) or []
        both, none_none = _row(rows, f"pre-train {m}, fine-tune {m}"), _row(rows, "pre-train none, fine-tune none")
        ft_only = _row(rows, f"pre-train none, fine-tune {m}")
        if not (both and none_none and ft_only):
            continue
        d = _vs(both, none_none, n)
        e = _vs(both, ft_only, n)
        parts.append(f"{table}: reduction in both stages minus neither: {_say(d, unit)}; pre-training with {m} "
                     f"before fine-tuning with it, minus fine-tuning with it only: {_say(e, unit)}.")
        ok = ok and not_worse(d)
    parts.append(_held(ok) + ("" if ok else " It needs a speed-up above 1 and an accuracy not significantly below "
                                             "the unpruned model's."))
    return " ".join(parts) + _budget(tables)


def trips(tables: Tables, speed, prof) -> str:
    return _pretrain_2x2("trips", "TRIPS", "that selecting the text-relevant patches during pre-training makes "
                         "pre-training faster while the fine-tuned model keeps (or improves) the unpruned model's "
                         "accuracy", tables, speed, prof)


def elip(tables: Tables, speed, prof) -> str:
    return _pretrain_2x2("elip", "ELIP", "that removing and merging the less relevant patches during pre-training "
                         "saves memory and pre-training time (about 15% of BLIP's) at about the unpruned accuracy",
                         tables, speed, prof)


def _versus(tables: Tables, table: str, own: str, others: List[str], unit: str, prof) -> List[tuple]:
    rows = tables.get(table) or []
    a = _row(rows, own)
    return [(o, _vs(a, _row(rows, o), prof.n_boot)) for o in others if a and _row(rows, o)]


def tip(tables: Tables, speed, prof) -> str:
    own = "TiP (stage 1 + stage 2, distilled)"
    res = _versus(tables, "vqa", own, ["unpruned", "evit", "tome", "random"], "points", prof)
    said = "; ".join(f"minus {o}: {_say(d, 'points')}" for o, d in res)
    base = [d for o, d in res if o == "unpruned"]
    ok = bool(res) and all(better(d) or not_worse(d) for o, d in res if o != "unpruned") and \
        all(d["diff"] > -1.0 or not_worse(d) for d in base)
    return (f"TiP claims that text-guided pruners trained in two stages (pruners distilled from the unpruned model, "
            f"then jointly) keep a single-stream model close to its unpruned accuracy and ahead of unguided pruning "
            f"at the same keep. Measured on the ViLT-style model at keep {prof.keep}: TiP {said}. "
            + _held(ok) + _budget(tables))


def laps(tables: Tables, speed, prof) -> str:
    parts = [f"LAPS claims that slimming patches by their relevance to the caption improves retrieval over the "
             f"unpruned model while it keeps fewer patches, and beats other pruning at the same budget."]
    ok = True
    for own in ("LAPS (paper mode)", "LAPS (released mode)"):
        res = _versus(tables, "retrieval", own, ["unpruned", "trips", "evit", "tome"], "r_mean", prof)
        if not res:
            continue
        parts.append(f"{own}: " + "; ".join(f"minus {o}: {_say(d, 'r_mean')}" for o, d in res) + ".")
        ok = ok and all(not_worse(d) for _, d in res)
    return " ".join(parts) + " " + _held(ok) + _budget(tables)


def dynamicvit(tables: Tables, speed, prof) -> str:
    res = _versus(tables, "vqa", "dynamicvit", ["unpruned", "evit"], "points", prof)
    said = "; ".join(f"minus {o}: {_say(d, 'points')}" for o, d in res)
    d_unp = dict(res).get("unpruned")
    d_evit = dict(res).get("evit")
    ok = d_unp is not None and (d_unp["diff"] >= -0.5 or not_worse(d_unp)) and d_evit is not None and not_worse(d_evit)
    return (f"DynamicViT claims that its learned predictors, trained with the ratio and distillation losses, keep "
            f"about {prof.keep} of the tokens while losing at most about half a point against the unpruned model, "
            f"and do better than a static rule. Measured at keep {prof.keep}: dynamicvit {said}. " + _held(ok)
            + _budget(tables))


VERDICTS: Dict[str, Callable[..., str]] = {"trips": trips, "elip": elip, "tip": tip, "laps": laps,
                                           "dynamicvit": dynamicvit}

__all__ = ["VERDICTS", "not_worse", "better"]
