"""The demo's report: ``report.md`` / ``report.html`` (sections, tables, curves, overlays) and ``results.json``
(every number, per-question scores included)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List

from ..reduce.registry import get_spec
from . import summary as S
from .profiles import METHODS, label

NAMES = {m: get_spec(m).title for m in list(METHODS) + ["lowres"]}  # display names, declared by each method


def environment(threads: int) -> Dict[str, Any]:
    import torch

    from ..runtime import available_cores

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": platform.machine(), "processor": _cpu_name(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cores_available": available_cores(), "threads": threads, "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _acc(r: Dict[str, Any]) -> str:
    if r.get("vqa_acc") is None:
        return "n/a"
    return f"{r['vqa_acc']:.1f} [{r['vqa_low']:.1f}, {r['vqa_high']:.1f}]"


MAIN_COLUMNS = [
    ("method", "method", ""), ("setup", "setup", ""), ("keep", "keep", "g"), (_acc, "VQA acc [95% CI]", ""),
    ("r_mean", "retrieval r_mean", ".1f"), ("gflops_image", "image GFLOPs", ".3f"), ("image_tokens", "image tokens", ".1f"),
    ("throughput", "pairs/s", ".0f"), ("speedup", "speed-up", ".2f"), ("survival", "object survival", ".2f"),
    ("ground_prec", "grounding prec.", ".2f"), ("ground_rec", "grounding recall", ".2f"),
]
PAIRED_COLUMNS = [
    ("a", "A", ""), ("b", "B", ""), ("setup", "setup", ""), ("keep", "keep", "g"), ("acc_a", "A acc", ".1f"),
    ("acc_b", "B acc", ".1f"), (lambda t: f"{t['diff']:+.1f} [{t['low']:+.1f}, {t['high']:+.1f}]", "A - B [95% CI]", ""),
    (lambda t: S.fmt_p(t["p_mcnemar"]), "McNemar", ""), (lambda t: S.fmt_p(t["p_bootstrap"]), "paired bootstrap", ""),
]



def _interval(key: str):
    return lambda r: f"{r[key]:.1f} [{r[key + '_low']:.1f}, {r[key + '_high']:.1f}]"


CAPTION_COLUMNS = [
    ("method", "method", ""), ("keep", "keep", "g"), (_interval("CIDEr"), "CIDEr [95% CI]", ""), ("Bleu_4", "BLEU-4", ".1f"),
    ("ROUGE_L", "ROUGE-L", ".1f"), ("image_tokens", "image tokens", ".1f"), ("seconds_per_image", "s per image", ".3f"),
]
GROUNDING_COLUMNS = [
    ("method", "method", ""), ("keep", "keep", "g"), (_interval("accuracy"), "accuracy [95% CI]", ""),
    ("kept_fraction", "target patches kept (%)", ".1f"), ("image_tokens", "image tokens", ".1f"),
]


def _task_section(plan, res: Dict[str, Any]) -> List[Any]:
    """The captioning and grounding tables (none when the profile has no such rows)."""
    from ..viz.report import Section, Table

    p, tables = plan.prof, []
    if res.get("caption"):
        tables.append(Table(res["caption"], CAPTION_COLUMNS, (
            f"captioning: a captioner trained {p.caption.steps} steps from retrieval-none, beam {p.caption_beams}, on "
            f"{'the first %d' % p.caption_images if p.caption_images else 'all'} test images; CIDEr-D x100 with a 95% "
            "bootstrap interval over images; blind: the same captioner given a grey image; text-guided methods are "
            "guided by the prompt's text")))
    if res.get("grounding_refs"):
        n = p.grounding_expressions
        tables.append(Table(res["grounding_refs"], GROUNDING_COLUMNS, (
            f"grounding: {'the first %d' % n if n else 'all'} referring expressions of the test images, the box "
            "chosen among every object's box by Grad-CAM of "
            + ("the captioner's likelihood of the expression" if p.grounding_mode == "caption"
               else "retrieval-none's ITM score") + ", hit = IoU >= 0.5, 95% "
            "bootstrap interval over expressions; random box: a uniformly drawn candidate; target patches kept: "
            "the share of the target's patches still kept as tokens of their own")))
    return [Section("Captioning and grounding", tables=tables)] if tables else []


def _plots(plan, sweep: List[Dict[str, Any]], rows: List[Dict[str, Any]]) -> List[Any]:
    from ..viz.plots import Series, plot_curves
    from ..viz.report import Figure

    by = {(r["method"], r["setup"]): r for r in rows}
    u, blind = by[("none", "fine-tuned unpruned")], by[("blind", "image replaced by grey")]
    tuned = {m: by[(m, "fine-tuned with it")] for m in plan.prof.tuned}
    figs = []
    for x, xlabel, name in (("gflops_image", "image-encoder GFLOPs per example", "curve_gflops.png"),
                            ("throughput", f"pairs/s (whole model, CPU, batch {plan.prof.bench_batch})", "curve_throughput.png")):
        series = []
        for m in list(METHODS) + ["lowres"]:
            pts = sorted((r for r in sweep if r["method"] == m), key=lambda r: -r["keep"])
            series.append(Series(NAMES[m], [r.get(x) for r in pts], [r["vqa_acc"] for r in pts],
                                 [r["vqa_low"] for r in pts], [r["vqa_high"] for r in pts],
                                 labels=[f"{r['keep']:g}" for r in pts]))
        learned = [r for r in rows if r["setup"] == "fine-tuned with its losses" and r.get(x) is not None]
        if learned:  # DynamicViT, TiP: one point each, diamonds
            series.append(Series("fine-tuned with its losses (diamonds)", [r.get(x) for r in learned],
                                 [r["vqa_acc"] for r in learned], [r["vqa_low"] for r in learned],
                                 [r["vqa_high"] for r in learned], line=False, marker="D",
                                 labels=[r["method"] for r in learned], color=len(METHODS) + 1))
        for i, m in enumerate(METHODS):  # same colour as the method's curve, open squares
            if m in tuned:
                r = tuned[m]
                series.append(Series("" if series[-1].line is False else "fine-tuned with the method (open squares)",
                                     [r.get(x)], [r["vqa_acc"]], [r["vqa_low"]], [r["vqa_high"]], line=False,
                                     marker="s", color=i))
        path = plot_curves(series, plan.out / "report" / name, xlabel, "VQA accuracy (%)",
                           title=f"VQA accuracy against {'image GFLOPs' if x == 'gflops_image' else 'throughput'}",
                           reference=("unpruned", u.get(x), u["vqa_acc"]),
                           band=("blind (95% CI shaded)", blind["vqa_acc"], blind["vqa_low"], blind["vqa_high"]))
        figs.append(Figure(path, f"VQA accuracy (95% bootstrap CI) against {xlabel}: each method applied at inference "
                                 "to the unpruned fine-tuned model at the sweep's keeps (labels), the methods fine-tuned "
                                 "with reduction (squares), the unpruned model (star), the blind baseline (dashed)"))
    return figs


def _setup_bullets(plan, env: Dict[str, Any], seconds: float) -> List[str]:
    p = plan.prof
    pre = (f"pre-trained {p.pretrain.steps} steps (lr {p.pretrain.lr:g}, batch {p.pretrain.batch_size}, "
           f"options {p.pretrain.options})" if p.pretrain.steps else "no pre-training: fine-tuned from scratch")
    if p.pretrain.steps and p.pretrain_task == "vqa":
        pre = pre.replace("pre-trained", "first stage: VQA from scratch,", 1)
    if p.warmup.steps:
        pre += (f", after a warm-up of {p.warmup.steps} steps on the {', '.join(p.warmup_types)} questions only (lr "
                f"{p.warmup.lr:g}, batch {p.warmup.batch_size})")
    for part in p.first_parts:
        what = f"the {', '.join(part.types)} questions only" if part.types else "every question"
        rep = "".join(f", the {t} questions {k} times" for t, k in part.repeat.items())
        pre += f"; then {part.recipe.steps} steps on {what}{rep} (lr {part.recipe.lr:g})"
    v = plan.cfg.vision
    return [
        f"{env['date']}; {env['platform']} ({env['processor']}), {env['cores_available']} cores available; torch "
        f"{env['torch']}, {env['torch_threads']} thread(s); OMP_NUM_THREADS={env['env']['OMP_NUM_THREADS']}, "
        f"MKL_NUM_THREADS={env['env']['MKL_NUM_THREADS']}",
        f"profile {p.name}: wall time {seconds / 60:.1f} min for this invocation (stages kept from earlier runs are "
        "listed with their own time under 'Wall time per stage')",
        f"scenes data: {p.scenes.images} images of {p.scenes.image_size} px, {p.scenes.min_objects}-"
        f"{p.scenes.max_objects} objects ({p.scenes.family} family), up to {p.scenes.questions_per_image} questions per image, "
        f"{p.scenes.test_fraction:g} of the images for testing",
        f"model: `small` with {p.model} ({v.grid}x{v.grid} = {v.num_patches} patches, {v.layers} ViT layers); {pre}",
        f"VQA fine-tuning: {p.vqa.steps} steps, lr {p.vqa.lr:g}, batch {p.vqa.batch_size}, seeds {list(p.seeds)}; "
        f"retrieval: {p.retrieval.steps} steps, lr {p.retrieval.lr:g}, batch {p.retrieval.batch_size}; two-stage "
        f"evaluation on {'the first %d' % p.retrieval_images if p.retrieval_images else 'all'} test images, ITM "
        f"re-ranking the top {p.retrieval_k} of ITC",
        f"schedules: {p.schedules}; keeps swept at inference {list(p.sweep)}, the main keep {p.main_keep:g} is also "
        "the fine-tuned-with-method setting",
        "keep = share of image tokens left after the image encoder (about); GFLOPs and tokens: image encoder per "
        "example, counted by running the fine-tuned model; pairs/s and speed-up: whole model with random weights, "
        f"batch {p.bench_batch}, median of {p.bench_repeats} interleaved rounds",
        "object survival: per question, the share of the asked-about objects on which at least one individually "
        "kept patch lies after the last reduction, averaged; precision / recall: share of kept patches on those "
        "objects / of their patches kept (patches inside fused or merged tokens count as not kept)",
        f"95% intervals: percentile bootstrap over test questions ({p.n_boot} resamples, seed 0)",
    ]


def write_demo_report(plan, res: Dict[str, Any], st, threads: int, seconds: float) -> Path:
    from ..viz.report import Figure, Section, Table, write_sections

    from . import relevance as R
    from .report_relevance import relevance_sections

    prof = plan.prof
    rows, sweep = S.main_rows(prof, res), S.sweep_rows(prof, res)
    tests = S.paired_tests(prof, res)
    seeds = S.seed_rows(prof, res)
    said, informative = S.sentences(prof, rows, tests, seeds)
    rel = R.relevance_numbers(plan, res, tests)
    said += rel["guidance"] + [R.check_sentence(rel["checks"])] + rel["findings"] + S.task_sentences(res)
    env = environment(threads)
    (plan.out / "report").mkdir(exist_ok=True)
    sections = [
        Section("What the numbers say", text=said),
        Section("Setup", bullets=_setup_bullets(plan, env, seconds)),
        Section("Main table", tables=[Table(rows, MAIN_COLUMNS, "chance: uniform guessing over the answer list (VQA), "
                                            "a random ranking of the test gallery (retrieval r_mean); majority: the most "
                                            "common training answer for every question; blind: the same model and "
                                            "training with every image replaced by a constant grey one")]),
        Section("Accuracy against cost", figures=_plots(plan, sweep, rows),
                tables=[Table(sweep, [c for c in MAIN_COLUMNS if c[0] not in ("setup", "r_mean")])]),
        Section("Paired tests", text=["The same test questions answered by two models: the difference in VQA accuracy "
                                      "(points) with its paired-bootstrap 95% interval, McNemar's test on the "
                                      "questions only one of them gets right (exact below 25 such questions) and the "
                                      "paired-bootstrap p-value."], tables=[Table(tests, PAIRED_COLUMNS)]),
    ]
    sections += _task_section(plan, res)
    extra = relevance_sections(plan, rel)
    sections[2:2] = extra[:1]  # the targets right after the setup
    sections += extra[1:]
    if seeds:  # one cell per list, "a / b / c" (a table's default ">" reads as token counts layer by layer)
        seed_cells = [{**r, "seeds": " / ".join(str(x) for x in r["seeds"]),
                       "accuracies": " / ".join(f"{a:.1f}" for a in r["accuracies"])} for r in seeds]
        sections.append(Section("Seeds", tables=[Table(seed_cells, [("method", "row", ""), ("seeds", "seeds", ""),
                                                                ("accuracies", "VQA acc per seed", ".1f"),
                                                                ("mean", "mean", ".1f"), ("sd", "sd", ".2f")])]))
    figs = [Figure(plan.out / p, c) for p, c in res["overlays"]["figures"]]
    if figs:
        sections.append(Section("Which patches are kept", figures=figs))
    train = [{"run": k, "steps": v["steps"], "first": (v.get("first") or {}).get("loss"),
              "last": (v.get("last") or {}).get("loss"), "rate": (v.get("last") or {}).get("samples_per_s")}
             for k, v in res["train"].items()]
    sections.append(Section("Training runs", tables=[Table(train, [
        ("run", "run", ""), ("steps", "steps", ""), ("first", "loss, first interval", ".3f"),
        ("last", "loss, last interval", ".3f"), ("rate", "samples/s (last interval)", ".0f")])]))
    timings = st.timings + [{"stage": "total (this invocation)", "seconds": seconds, "cached": False}]
    sections.append(Section("Wall time per stage", tables=[Table(
        timings, [("stage", "stage", ""), ("seconds", "seconds", ".1f"),
                  (lambda t: "kept from an earlier run" if t["cached"] else "run now", "", "")])]))
    title = "vlprune demo: accuracy and cost of image-token reduction on scenes" + (" (smoke run)" if prof.smoke else "")
    md, _ = write_sections(plan.out, title, sections)
    results = {"profile": asdict(prof), "environment": env, "seconds": seconds, "stages": st.timings,
               "informative": informative, "sentences": said, "rows": rows, "sweep": sweep, "paired": tests,
               "seeds": seeds, "baselines": res["baselines"], "vqa": res["vqa"], "retrieval": res["retrieval"],
               "bench": res["bench"], "train": res["train"], "data": res["data"],
               "caption": res.get("caption"), "grounding_refs": res.get("grounding_refs"),
               **{k: rel[k] for k in ("checks", "per_type", "relevance", "matched", "objects_to_budget", "findings",
                                      "guidance")}}
    (plan.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return md


__all__ = ["write_demo_report", "environment", "MAIN_COLUMNS", "label"]
