"""The report's relevance sections: the benchmark's targets, accuracy per question type, the relevance table and
its curves, and the comparisons at matched GFLOPs (numbers from ``demo.relevance``)."""

from __future__ import annotations

from typing import Any, Dict, List

from .profiles import METHODS
from .summary import fmt_p

MAIN_SETUPS = ("fine-tuned unpruned", "fine-tuned with it", "fine-tuned with its losses", "image replaced by grey")


def _ci(d: Dict[str, Any], fmt: str = ".2f") -> str:
    if d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]" + (f" (n={d['n']})" if fmt == ".1f" else "")


def _type_columns(types: List[str]) -> List[Any]:
    cols: List[Any] = [("method", "method", ""), ("setup", "setup", ""), ("keep", "keep", "g")]
    for t in types:
        cols.append((lambda r, t=t: f"{r['types'][t]:.1f}" + ("" if r["method"] == "blind" else
                                                               f" ({r['over_blind'][t]:+.1f})"), t, ""))
    return cols


def _relevance_plots(plan, rel: List[Dict[str, Any]]) -> List[Any]:
    from ..viz.plots import Series, plot_curves
    from ..viz.report import Figure

    figs = []
    for key, what, name in (("lift", "relevance lift (asked-about minus other objects' survival)", "curve_lift.png"),
                            ("sensitivity", "question sensitivity (IoU of the kept patches, 1 = same)",
                             "curve_sensitivity.png")):
        series = []
        for m in METHODS:
            pts = sorted((r for r in rel if r["method"] == m and r["setup"] == "at inference"
                          and r[key]["mean"] is not None), key=lambda r: -r["keep"])
            series.append(Series(m, [r["keep"] for r in pts], [r[key]["mean"] for r in pts],
                                 [r[key]["low"] for r in pts], [r[key]["high"] for r in pts]))
        try:
            path = plot_curves(series, plan.out / "report" / name, "keep (share of image tokens left)", what,
                               title=f"{what.split(' (')[0]} against keep")
        except ValueError:  # nothing measured (e.g. grounding off at every sweep point)
            continue
        figs.append(Figure(path, f"{what} of each method applied at inference to the unpruned model, at each keep "
                                 "of the sweep, with 95% bootstrap intervals"))
    return figs


def relevance_sections(plan, rel: Dict[str, Any]) -> List[Any]:
    """[Targets, Accuracy per question type, Text relevance, Matched cost] report sections."""
    from ..viz.report import Section, Table

    prof = plan.prof
    ratio = rel["objects_to_budget"]
    targets = Section("Targets", text=[
        "What the built-in benchmark must show for the comparisons to mean something: the unpruned model well above "
        "the blind one overall and on every question type, a lower resolution that loses accuracy at the cost of "
        "TRIPS at keep 0.35, and objects that cover at least twice the patches kept at keep 0.25 (here "
        f"{'n/a' if ratio.get('ratio') is None else format(ratio['ratio'], '.2f')}, from {ratio['source']})."],
        tables=[Table(rel["checks"], [("check", "target", ""), ("target", "at least", "g"),
                                      ("value", "measured", ".2f"), (lambda c: "yes" if c["met"] else "NO", "met", "")])])
    types = sorted(rel["per_type"][-1]["types"])
    keep_rows = [r for r in rel["per_type"] if r["setup"].split(", seed ")[0] in MAIN_SETUPS
                 or (r["setup"] == "at inference" and r["keep"] == prof.main_keep)]
    per_type = Section("Accuracy per question type", text=[
        "VQA accuracy (%) per question type, in brackets the points above the blind row on the same questions; "
        "every evaluation's numbers are in results.json (per_type)."], tables=[Table(keep_rows, _type_columns(types))])
    text = Section("Text relevance", text=[
        "Does the selection keep what the question asks about? After the image encoder's last reduction an object "
        "survives when a token stands for at least one of its patches alone (patches inside fused or merged tokens "
        "do not count). Relevance lift: survival of the asked-about objects minus survival of the image's other "
        "objects, per question (about 0 when the selection ignores the text). Question sensitivity: IoU of the patch "
        "sets kept for two questions about different objects of one image (1.0 when the selection depends on the "
        "image alone; random draws other patches per question without reading it). Accuracy split: accuracy on the "
        "questions whose asked-about objects all survived, and on the others. Questions naming no object (an "
        "existence question answered 'no') take no part. 95% bootstrap intervals over questions (over pairs for "
        "the sensitivity)."],
        tables=[Table(rel["relevance"], [
            ("method", "method", ""), ("setup", "setup", ""), ("keep", "keep", "g"), ("survival", "survival", ".2f"),
            (lambda r: _ci(r["lift"]), "relevance lift [95% CI]", ""),
            (lambda r: _ci(r["sensitivity"]), "question sensitivity [95% CI]", ""),
            (lambda r: _ci(r["acc_survived"], ".1f"), "acc, object survived", ""),
            (lambda r: _ci(r["acc_lost"], ".1f"), "acc, object lost", "")])],
        figures=_relevance_plots(plan, rel["relevance"]))
    match = Section("Matched cost", text=[
        "Every method at the image-encoder GFLOPs of TRIPS at each matched keep: its accuracy interpolated along its "
        "own accuracy-vs-GFLOPs curve (n/a outside its measured range), and its nearest measured point, against which "
        "TRIPS is tested on the same questions (McNemar and paired bootstrap). EViT, ToMe and random at the same keep "
        "have TRIPS's token counts; lowres is evaluated besides the sweep at the image size whose counted GFLOPs are "
        "nearest (the gap is stated)."],
        tables=[Table(rel["matched"], [
            ("keep", "TRIPS keep", "g"), ("gflops", "TRIPS GFLOPs", ".3g"), ("method", "method", ""),
            ("acc_interp", "acc at these GFLOPs (interp.)", ".1f"), ("near_key", "nearest point", ""),
            ("near_gflops", "its GFLOPs", ".3g"), (lambda r: f"{100 * r['near_gap']:+.0f}%", "gap", ""),
            ("near_acc", "its acc", ".1f"),
            (lambda r: "" if "test" not in r else f"{r['test']['diff']:+.1f} [{r['test']['low']:+.1f}, "
                                                  f"{r['test']['high']:+.1f}]", "TRIPS - it [95% CI]", ""),
            (lambda r: "" if "test" not in r else fmt_p(r["test"]["p_mcnemar"]), "McNemar", ""),
            (lambda r: "" if "test" not in r else fmt_p(r["test"]["p_bootstrap"]), "paired bootstrap", "")])])
    return [targets, per_type, text, match]


__all__ = ["relevance_sections"]
