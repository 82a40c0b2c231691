"""The numbers of the protocols' report, as pure functions of the stages' results: convergence of a validation
curve, the rows of each table pooled over seeds with 95% intervals, paired differences against a reference row.

Intervals: VQA accuracy, a percentile bootstrap over the test questions of every seed pooled; a difference
between two VQA rows, the paired bootstrap over the same (seed, question) pairs. Retrieval R@K, the Wilson
interval of the hits over every seed's queries pooled; r_mean, a t interval over the seeds (none with one seed:
the report says so).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .plan import Plan, Row

RECALLS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
# two-sided 97.5% Student t quantiles for 1..10 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def plateau(curve: Sequence[Sequence[float]], tol: float) -> Optional[bool]:
    """Whether a validation curve ``[(step, value), ...]`` has levelled off: its best value in the last third of
    the points beats the best before it by at most ``tol``. None with fewer than 3 points (cannot tell)."""
    vals = [float(v) for _, v in curve]
    if len(vals) < 3:
        return None
    cut = len(vals) - max(1, len(vals) // 3)
    return max(vals[cut:]) - max(vals[:cut]) <= tol


def wilson(hits: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """Wilson score interval of a proportion (hits out of n), as percentages."""
    if n <= 0:
        raise ValueError(f"wilson needs n >= 1, got {n}")
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return 100.0 * max(0.0, mid - half), 100.0 * min(1.0, mid + half)


def t_interval(values: Sequence[float]) -> Optional[Tuple[float, float]]:
    """95% t interval of the mean of ``values`` (None with fewer than 2)."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    t = _T975[min(n - 1, len(_T975)) - 1]
    return m - t * sd / math.sqrt(n), m + t * sd / math.sqrt(n)


def row_groups(plan: Plan, protocol: str) -> Dict[str, Dict[str, List[Row]]]:
    """{table: {label: [the row of each seed]}} of one protocol, in plan order."""
    out: Dict[str, Dict[str, List[Row]]] = {}
    for r in plan.rows:
        if r.protocol == protocol:
            out.setdefault(r.table, {}).setdefault(r.label, []).append(r)
    return out


def shared_prefix(chains: Sequence[Sequence[str]]) -> int:
    """How many first stages every chain shares (a warm-up or pre-training that every row of a table starts from)."""
    n = 0
    while all(len(c) > n + 1 for c in chains) and len({c[n] for c in chains}) == 1:
        n += 1
    return n


def summarize(plan: Plan, res: Dict[str, Any], rows: List[Row], n_boot: int, shared: int = 0) -> Dict[str, Any]:
    """One table line: the row's label, cells, budget (``warmup``: the samples of its first ``shared`` stages,
    which every row of its table shares), metric (pooled over its seeds) with its interval, image tokens, and
    whether the last training stage of every seed converged."""
    from ..stats import bootstrap_ci

    first = rows[0]
    last = [res["train"][r.chain[-1]] for r in rows]
    conv = [plateau(s["val"], plan.prof.plateau_tol) for s in last]
    out: Dict[str, Any] = {"label": first.label, **first.cells, "seeds": len(rows), "budget": plan.budget(first),
                           "warmup": sum(plan.trains[n].samples for n in first.chain[:shared]),
                           "converged": None if any(c is None for c in conv) else all(conv),
                           "stages": " > ".join(first.chain)}
    evs = [res["eval"][r.eval] for r in rows]
    out["image_tokens"] = _mean([e.get("image_tokens") for e in evs])
    out["slimmed_tokens"] = _mean([e.get("slimmed_tokens") for e in evs])
    if first.eval and "scores" in evs[0]:
        scores = [s for e in evs for s in e["scores"]]
        iv = bootstrap_ci(scores, n_boot)
        out.update(metric="accuracy", value=100 * iv.mean, low=100 * iv.low, high=100 * iv.high, scores=scores)
        return out
    n_img, n_cap = sum(e["images"] for e in evs), sum(e.get("captions") or 0 for e in evs)
    for k in RECALLS:
        out[k] = _mean([e[k] for e in evs])
        n = n_img if k.startswith("txt") else n_cap
        if n:
            out[k + "_ci"] = wilson(out[k] / 100 * n, n)
    per_seed = [e["r_mean"] for e in evs]
    iv = t_interval(per_seed)
    out.update(metric="r_mean", value=_mean(per_seed), low=iv[0] if iv else None, high=iv[1] if iv else None,
               per_seed=per_seed, images=evs[0]["images"])
    return out


def paired(a: Dict[str, Any], b: Dict[str, Any], n_boot: int) -> Dict[str, Any]:
    """a minus b: for VQA the paired bootstrap (diff, low, high, p) in points; for retrieval the difference of the
    r_mean means and, with 2+ seeds, the t interval of the per-seed differences."""
    from ..stats import paired_bootstrap

    if a["metric"] == "accuracy":
        p = paired_bootstrap(a["scores"], b["scores"], n_boot)
        return {"diff": 100 * p.diff, "low": 100 * p.low, "high": 100 * p.high, "p": p.p}
    d = [x - y for x, y in zip(a["per_seed"], b["per_seed"])]
    iv = t_interval(d)
    return {"diff": _mean(d), "low": iv[0] if iv else None, "high": iv[1] if iv else None, "p": None}


def pretrain_speed(res: Dict[str, Any], plan: Plan, methods: Sequence[str]) -> List[Dict[str, Any]]:
    """Per pre-training method (pooled over seeds): samples/s, training wall time, saved-for-backward memory,
    and the speed-up in samples/s over the unpruned pre-training."""
    out = []
    for m in methods:
        runs = [res["train"][n] for n in plan.trains if n.startswith(f"pt-{m}-s")]
        out.append({"pretrain": m, "samples_per_s": _mean([r["samples_per_s"] for r in runs]),
                    "train_seconds": _mean([r["train_seconds"] for r in runs]),
                    "saved_mib": _mean([r["saved_mib"] for r in runs]),
                    "cuda_peak_mib": _mean([r["cuda_peak_mib"] for r in runs]),
                    "converged": _all([plateau(r["val"], plan.prof.plateau_tol) for r in runs])})
    base = out[0]["samples_per_s"]
    for r in out:
        r["speedup"] = r["samples_per_s"] / base if base and r["samples_per_s"] else None
    return out


def _mean(xs) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _all(xs) -> Optional[bool]:
    return None if any(x is None for x in xs) else all(xs)


__all__ = ["shared_prefix", "plateau", "wilson", "t_interval", "row_groups", "summarize", "paired", "pretrain_speed", "RECALLS"]
