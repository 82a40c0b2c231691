"""The demo's numbers: table rows with 95% bootstrap intervals, the sweep, paired tests, seeds, and the sentences
the report generates from them. Pure bookkeeping on the stages' results (no torch)."""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..stats import bootstrap_ci, mcnemar, paired_bootstrap
from .profiles import METHODS, label

ALPHA = 0.05


def _ci(scores: List[float], n_boot: int) -> Dict[str, float]:
    iv = bootstrap_ci(scores, n_boot=n_boot, alpha=ALPHA, seed=0)
    return {"vqa_acc": 100 * iv.mean, "vqa_low": 100 * iv.low, "vqa_high": 100 * iv.high, "questions": len(scores)}


def _binary(scores: List[float]) -> bool:
    return all(s in (0.0, 1.0) for s in scores)


def compare(a: List[float], b: List[float], n_boot: int) -> Dict[str, Any]:
    """Paired comparison of two models' per-question scores (a - b, in points)."""
    pb = paired_bootstrap(a, b, n_boot=n_boot, alpha=ALPHA, seed=0)
    mc = mcnemar(a, b) if _binary(a) and _binary(b) else None
    return {"diff": 100 * pb.diff, "low": 100 * pb.low, "high": 100 * pb.high, "p_bootstrap": pb.p,
            "p_mcnemar": None if mc is None else mc.p, "discordant": None if mc is None else [mc.b, mc.c],
            "acc_a": 100 * sum(a) / len(a), "acc_b": 100 * sum(b) / len(b)}


def _cost(bench: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    b = bench or {}
    return {"throughput": b.get("throughput"), "speedup": b.get("speedup")}


def _ground(ev: Dict[str, Any]) -> Dict[str, Any]:
    g = ev.get("grounding") or {}
    return {"survival": g.get("survival"), "ground_prec": g.get("precision"), "ground_rec": g.get("recall")}


def _row(method: str, setup: str, keep: Optional[float], ev: Dict[str, Any], n_boot: int, bench=None,
         r_mean=None) -> Dict[str, Any]:
    return {"method": method, "setup": setup, "keep": keep, **_ci(ev["scores"], n_boot), "r_mean": r_mean,
            "gflops_image": ev.get("gflops"), "image_tokens": ev.get("image_tokens"), **_cost(bench), **_ground(ev)}


def main_rows(prof, res: Dict[str, Any]) -> List[Dict[str, Any]]:
    ev, ret, bench, nb = res["vqa"], res["retrieval"], res["bench"], prof.n_boot
    k = label(prof.main_keep)
    rows = [_row("none", "fine-tuned unpruned", None, ev["none"], nb, bench["none"], ret["none"]["r_mean"])]
    for m in list(METHODS) + ["lowres"]:
        r = ret.get(m, {}).get("r_mean") if m != "lowres" else None
        rows.append(_row(m, "at inference", prof.main_keep, ev[f"{m}-{k}"], nb, bench[f"{m}-{k}"], r))
    for m in prof.tuned:
        rows.append(_row(m, "fine-tuned with it", prof.main_keep, ev[f"vqa-{m}"], nb, bench[f"{m}-{k}"]))
    for m in prof.learned:  # no bench row: their cost at inference is in GFLOPs and tokens
        rows.append(_row(m, "fine-tuned with its losses", None, ev[f"vqa-{m}"], nb))
    rows.append({"method": "blind", "setup": "image replaced by grey", **_ci(ev["vqa-blind"]["scores"], nb)})
    base = res["baselines"]
    rows.append({"method": "chance", "setup": f"uniform over {base['answers']} answers",
                 **_ci(base["uniform_scores"], nb), "r_mean": base["retrieval_chance"]})
    rows.append({"method": "majority", "setup": f"always {base['majority_answer']!r}", **_ci(base["majority_scores"], nb)})
    return rows


def sweep_rows(prof, res: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    for m in list(METHODS) + ["lowres"]:
        for f in prof.sweep:
            key = f"{m}-{label(f)}"
            out.append(_row(m, "at inference", f, res["vqa"][key], prof.n_boot, res["bench"][key]))
    for key, ev in res["vqa"].items():  # lowres at the image sizes that match TRIPS's GFLOPs (besides the sweep)
        if key.startswith("lowres-px"):
            out.append({**_row("lowres", "at inference", ev["keep"], ev, prof.n_boot, res["bench"].get(key)),
                        "image_size": ev.get("image_size")})
    return sorted(out, key=lambda r: ((list(METHODS) + ["lowres"]).index(r["method"]), -r["keep"]))


def paired_tests(prof, res: Dict[str, Any]) -> List[Dict[str, Any]]:
    ev, nb = res["vqa"], prof.n_boot
    out = [{"a": "none", "b": "blind", "setup": "fine-tuned", "keep": None,
            **compare(ev["none"]["scores"], ev["vqa-blind"]["scores"], nb)}]
    for f in sorted(prof.sweep, reverse=True):
        for other in ("evit", "random"):
            a, b = ev[f"trips-{label(f)}"], ev[f"{other}-{label(f)}"]
            out.append({"a": "trips", "b": other, "setup": "at inference", "keep": f, **compare(a["scores"], b["scores"], nb)})
    for other in [o for o in ("evit", "random") if "trips" in prof.tuned and o in prof.tuned]:
        out.append({"a": "trips", "b": other, "setup": "fine-tuned with it", "keep": prof.main_keep,
                    **compare(ev["vqa-trips"]["scores"], ev[f"vqa-{other}"]["scores"], nb)})
    return out


def seed_rows(prof, res: Dict[str, Any]) -> List[Dict[str, Any]]:
    if len(prof.seeds) < 2:
        return []
    out = []
    for row in prof.seed_rows:
        accs = []
        for i, seed in enumerate(prof.seeds):
            name = ("none" if row == "none" else f"vqa-{row}") if i == 0 else f"vqa-{row}-s{seed}"
            accs.append(res["vqa"][name]["accuracy"])
        out.append({"method": row, "seeds": list(prof.seeds), "accuracies": accs, "mean": statistics.mean(accs),
                    "sd": statistics.stdev(accs)})
    return out


def fmt_p(p: Optional[float]) -> str:
    if p is None:
        return "n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _p(c: Dict[str, Any]) -> float:
    return c["p_mcnemar"] if c["p_mcnemar"] is not None else c["p_bootstrap"]


def _versus(c: Dict[str, Any], where: str) -> str:
    name_a, name_b = _name(c["a"]), _name(c["b"])
    test = "McNemar" if c["p_mcnemar"] is not None else "paired bootstrap"
    ci = f"95% CI of the difference [{c['low']:+.1f}, {c['high']:+.1f}], {test} {fmt_p(_p(c))}"
    if _p(c) < ALPHA:
        side = "above" if c["diff"] > 0 else "below"
        return f"{where} {name_a} ({c['acc_a']:.1f}%) is {abs(c['diff']):.1f} points {side} {name_b} ({c['acc_b']:.1f}%; {ci})."
    return (f"{where} {name_a} ({c['acc_a']:.1f}%) is not significantly different from {name_b} ({c['acc_b']:.1f}%): "
            f"{c['diff']:+.1f} points ({ci}).")


def sentences(prof, rows: List[Dict[str, Any]], tests: List[Dict[str, Any]],
              seeds: Sequence[Dict[str, Any]] = ()) -> Tuple[List[str], bool]:
    """2-4 sentences generated from the numbers, and whether the unpruned model is clearly above blind."""
    by = {(r["method"], r["setup"]): r for r in rows}
    u, b = by[("none", "fine-tuned unpruned")], by[("blind", "image replaced by grey")]
    vs_blind = tests[0]
    clear = vs_blind["low"] > 0
    head = (f"Unpruned: {u['vqa_acc']:.1f}% [{u['vqa_low']:.1f}, {u['vqa_high']:.1f}] vs blind {b['vqa_acc']:.1f}% "
            f"[{b['vqa_low']:.1f}, {b['vqa_high']:.1f}] ({vs_blind['diff']:+.1f} points, {fmt_p(_p(vs_blind))})")
    if clear:
        out = [head + ": the model uses the image."]
    else:
        out = [head + ": the unpruned model is not clearly above the blind baseline, so the comparisons between "
                      "methods below are uninformative."]
    chance = by.get(("chance", next((k[1] for k in by if k[0] == "chance"), "")), {}).get("r_mean")
    if u.get("r_mean") is not None and chance:
        out[0] += (f" Retrieval (unpruned): r_mean {u['r_mean']:.1f} against {chance:.1f} for a random ranking "
                   f"({u['r_mean'] / chance:.1f}x chance).")
    low = min(prof.sweep)
    pick = [t for t in tests[1:] if t["setup"] == "at inference" and t["keep"] == low]
    pick += [t for t in tests[1:] if t["setup"] == "fine-tuned with it" and t["b"] == "evit"]
    for t in pick:
        where = (f"At keep {t['keep']:g} (applied at inference)," if t["setup"] == "at inference"
                 else f"Fine-tuned with the method at keep {t['keep']:g},")
        out.append(_versus(t, where))
    if seeds:
        out.append(f"Across seeds {', '.join(map(str, prof.seeds))} (VQA accuracy, mean and standard deviation): "
                   + "; ".join(f"{_name(r['method'])} {r['mean']:.1f} ± {r['sd']:.1f}" for r in seeds) + ".")
    if prof.smoke:
        out.insert(0, f"Smoke run ({prof.name} profile): a tiny model trained for {prof.pretrain.steps + prof.vqa.steps} steps on "
                      f"{prof.scenes.images} images; its accuracies are meaningless and only show that the pipeline "
                      "runs end to end.")
    return out, clear


def _baseline_sentence(task: str, metric: str, key: str, rows: List[Dict[str, Any]], base: str) -> str:
    """"<task> (unpruned): <metric> X [l, h] against Y [l, h] for <base> (r x)": the first row (unpruned) against
    the last (the baseline), with whether their 95% intervals overlap."""
    u, b = rows[0], rows[-1]
    ratio = f"{u[key] / b[key]:.1f}x" if b[key] > 0 else "the baseline is 0"
    apart = ("the intervals do not overlap" if u[f"{key}_low"] > b[f"{key}_high"]
             else "the intervals overlap: the model is not clearly above the baseline")
    return (f"{task} (unpruned): {metric} {u[key]:.1f} [{u[f'{key}_low']:.1f}, {u[f'{key}_high']:.1f}] against "
            f"{b[key]:.1f} [{b[f'{key}_low']:.1f}, {b[f'{key}_high']:.1f}] for {base} ({ratio}; {apart}).")


def task_sentences(res: Dict[str, Any]) -> List[str]:
    """The captioning and grounding rows' headline: the unpruned model against its baseline."""
    out = []
    if res.get("caption"):
        out.append(_baseline_sentence("Captioning", "CIDEr", "CIDEr", res["caption"], "the blind captioner"))
    if res.get("grounding_refs"):
        out.append(_baseline_sentence("Grounding of referring expressions", "accuracy", "accuracy",
                                      res["grounding_refs"], "a random candidate box"))
    return out


def _name(m: str) -> str:
    """A method's display name (its declared title); other rows ("blind") as they are."""
    from ..reduce.registry import METHODS as REGISTERED

    return REGISTERED.get(m).title if m in REGISTERED else m


__all__ = ["main_rows", "sweep_rows", "paired_tests", "seed_rows", "sentences", "task_sentences", "compare", "fmt_p"]
