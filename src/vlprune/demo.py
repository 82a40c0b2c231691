"""The main job on the built-in data: ``vlprune demo``.

1. generate the scenes data; 2. pre-train a ``small`` model (ITC + ITM + MLM); 3. fine-tune it for VQA and for
retrieval with each method (and evaluate the unpruned fine-tuned model with each method applied at inference
only); 4. evaluate (VQA accuracy, two-stage retrieval r_mean, image-encoder GFLOPs); 5. benchmark throughput;
6. measure grounding (share of kept patches on the object a question is about) and draw overlays of the patches
kept for different questions about the same image; 7. write ``report.md`` / ``report.html``.

Every training and evaluation goes through the same commands a user runs (``vlprune train`` / ``vlprune eval``,
called in-process), so the demo is also an end-to-end check of them. Each step's output is kept in ``out``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

# the methods compared, with settings that give comparable token counts on the 6-layer `small` ViT (64 patches):
# TRIPS/EViT/random keep 0.7 at layers 3 and 5 (65 -> 47 -> 35 tokens); ELIP keeps 0.7 N then 0.5 N from
# layers 3 and 5 (-> 46 -> 34); ToMe merges 8 tokens at layers 3-6 (-> 57 -> 49 -> 41 -> 33).
METHODS: Dict[str, Dict[str, Any]] = {
    "none": {},
    "trips": {"layers": (3, 5), "keep": 0.7},
    "elip": {"layers": (3, 5), "keep": (0.7, 0.5)},
    "evit": {"layers": (3, 5), "keep": 0.7},
    "tome": {"layers": (3, 4, 5, 6), "options": {"r": 8}},
    "random": {"layers": (3, 5), "keep": 0.7},
}


# the from-scratch pre-training recipe measured in README ("Pre-training"): MLM at a lower weight, so that it does
# not swamp ITC and ITM while they leave their plateau; ITM negatives turn hard over the run (the task's default)
PRETRAIN_LOSS = "itc=1,itm=1,mlm=0.3"


@dataclass(frozen=True)
class Plan:
    images: int
    pretrain_steps: int
    finetune_steps: int
    batch_size: int
    retrieval_k: int
    bench_repeats: int
    bench_batch: int
    test_fraction: float


FULL = Plan(images=1200, pretrain_steps=600, finetune_steps=100, batch_size=32, retrieval_k=16, bench_repeats=5,
            bench_batch=32, test_fraction=0.1)
QUICK = Plan(images=120, pretrain_steps=12, finetune_steps=6, batch_size=16, retrieval_k=4, bench_repeats=2,
             bench_batch=8, test_fraction=0.1)


_T0 = [time.perf_counter()]


def _say(msg: str) -> None:
    print(f"[demo {time.perf_counter() - _T0[0]:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _method_args(name: str) -> List[str]:
    m = METHODS[name]
    if name == "none":
        return []
    args = ["--method", name]
    if "layers" in m:
        args += ["--layers", ",".join(str(v) for v in m["layers"])]
    if "keep" in m:
        k = m["keep"]
        args += ["--keep", ",".join(str(v) for v in k) if isinstance(k, tuple) else str(k)]
    for key, v in m.get("options", {}).items():
        args += ["--option", f"{key}={v}"]
    return args


def _cli(argv: Sequence[str]) -> str:
    """Run ``vlprune ARGV`` in-process; raise on failure; return what it printed to stdout."""
    from .cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"'vlprune {' '.join(argv)}' failed with exit code {code}")
    return buf.getvalue()


def _json_tail(out: str) -> Dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def _finetune(task: str, method: str, plan: Plan, data: Path, pretrain: Path, out: Path) -> Path:
    run = out / f"{task}-{method}"
    train_file = data / ("vqa_train.json" if task == "vqa" else "retrieval_train.json")
    argv = ["train", task, "--train", str(train_file), "--images", str(data), "--init", str(pretrain),
            "--steps", str(plan.finetune_steps), "--batch-size", str(plan.batch_size), "--lr", "2e-4",
            "--out", str(run), "--overwrite", "--quiet", *_method_args(method)]
    if task == "vqa":
        argv += ["--answers", str(data / "answer_list.json")]
    _cli(argv)
    return run


def _evaluate(task: str, run: Path, data: Path, plan: Plan, method: Optional[str]) -> Dict[str, Any]:
    test = data / ("vqa_test.json" if task == "vqa" else "retrieval_test.json")
    argv = ["eval", task, "--checkpoint", str(run), "--test", str(test), "--images", str(data), "--json", "--quiet"]
    if task == "retrieval":
        argv += ["--k", str(plan.retrieval_k)]
    if method is not None:
        argv += _method_args(method) if method != "none" else ["--method", "none"]
    return _json_tail(_cli(argv))


def run_demo(out: Path, quick: bool = False, overwrite: bool = False, methods: Optional[Sequence[str]] = None) -> Path:
    """Run the whole demo into ``out``; returns the path of report.md."""
    import torch

    from .data.scenes import generate

    plan = QUICK if quick else FULL
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"the demo compares {list(METHODS)}; unknown: {unknown}")
    if "none" not in methods:
        methods.insert(0, "none")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = _T0[0] = time.perf_counter()
    times: Dict[str, float] = {}

    def stage(name: str):
        times[name] = time.perf_counter()
        _say(name)

    stage(f"1/7 generating scenes data ({plan.images} images)")
    data = out / "data"
    generate(data, images=plan.images, seed=0, image_size=64, test_fraction=plan.test_fraction)

    stage(f"2/7 pre-training the small model ({plan.pretrain_steps} steps, batch {plan.batch_size})")
    pretrain = out / "pretrain"
    _cli(["train", "pretrain", "--train", str(data / "pretrain.json"), "--images", str(data), "--model", "small",
          "--steps", str(plan.pretrain_steps), "--batch-size", str(plan.batch_size), "--lr", "3e-4",
          "--loss", PRETRAIN_LOSS,
          "--out", str(pretrain), "--overwrite", "--quiet"])
    pt_log = _metrics_summary(pretrain / "metrics.jsonl")

    rows: Dict[str, Dict[str, Any]] = {m: {"method": m, "setup": "fine-tuned with it"} for m in methods}
    infer_rows: Dict[str, Dict[str, Any]] = {}
    runs: Dict[Tuple[str, str], Path] = {}
    for task in ("vqa", "retrieval"):
        for i, m in enumerate(methods):
            stage(f"3/7 fine-tuning {task} with {m} ({i + 1}/{len(methods)}, {plan.finetune_steps} steps)")
            runs[(task, m)] = _finetune(task, m, plan, data, pretrain, out / "finetune")
        for m in methods:
            stage(f"4/7 evaluating {task} / {m}")
            res = _evaluate(task, runs[(task, m)], data, plan, None)
            _merge_eval(rows[m], task, res)
            if m != "none":  # the same method applied at inference only, to the unpruned fine-tuned model
                res = _evaluate(task, runs[(task, "none")], data, plan, m)
                _merge_eval(infer_rows.setdefault(m, {"method": m, "setup": "at inference only"}), task, res)

    stage("5/7 benchmarking throughput (small model, random weights, CPU)")
    bench = _bench(methods, plan)
    for r in list(rows.values()) + list(infer_rows.values()):
        b = bench.get(r["method"], {})
        r["throughput"] = b.get("throughput")
        r["speedup"] = b.get("speedup")
        r["gflops_total"] = b.get("gflops_total")

    stage("6/7 grounding and patch overlays")
    ground = _grounding(methods, runs, data)
    for m, g in ground.items():
        rows[m]["ground_prec"] = g["precision"]
        rows[m]["ground_rec"] = g["recall"]
    figures = _overlays(runs, data, out)

    stage("7/7 writing the report")
    all_rows = [rows[m] for m in methods] + [infer_rows[m] for m in methods if m in infer_rows]
    report = _write_report(out, all_rows, figures, plan, pt_log, quick, time.perf_counter() - t_start)
    (out / "results.json").write_text(json.dumps({"rows": all_rows, "bench": bench, "plan": plan.__dict__}, indent=1))
    _print_table(all_rows)
    print(f"\nreport: {report}  (and {report.with_suffix('.html')})")
    return report


def _merge_eval(row: Dict[str, Any], task: str, res: Dict[str, Any]) -> None:
    if task == "vqa":
        row["vqa_acc"] = res["accuracy"]
    else:
        row["r_mean"] = res["r_mean"]
    row["gflops_image"] = res["gflops"]
    row["image_tokens"] = res["image_tokens"]


def _metrics_summary(path: Path) -> str:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not lines:
        return "no metrics logged"
    first, last = lines[0], lines[-1]
    parts = [f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in ("itc", "itm", "mlm") if k in first and k in last]
    return f"pre-training losses (step {first['step']} -> {last['step']}): " + ", ".join(parts)


def _bench(methods: Sequence[str], plan: Plan) -> Dict[str, Dict[str, Any]]:
    from .bench.runner import BenchSettings, run_bench
    from .reduce.registry import ReduceConfig

    s = BenchSettings(model="small", text_len=16, batch_size=plan.bench_batch, repeats=plan.bench_repeats)
    rcs = [ReduceConfig(m, **METHODS[m]) for m in methods if m != "none"]
    rows = run_bench(s, rcs, progress=lambda msg: _say(f"  bench: {msg}"))
    return {r["method"]: r for r in rows}


def _scenes_masks(data: Path) -> Dict[str, str]:
    meta = json.loads((data / "scenes.json").read_text())
    return {s["image"]: s["mask"] for s in meta["scenes"]}


def _load_run(run: Path):
    from .data.tokenizer import TextTokenizer
    from .models.build import load_pretrained
    from .tasks.finetune import checkpoint_dir, tokenizer_dir

    ckpt = checkpoint_dir(run)
    model = load_pretrained(ckpt).eval()
    return model, TextTokenizer.from_dir(tokenizer_dir(ckpt))


def _grounding(methods: Sequence[str], runs, data: Path) -> Dict[str, Dict[str, float]]:
    from .data.images import ImageLoader
    from .tasks.grounding import grounding_scores

    entries = json.loads((data / "vqa_test.json").read_text())
    masks = _scenes_masks(data)
    out = {}
    for m in methods:
        model, tok = _load_run(runs[("vqa", m)])
        loader = ImageLoader.for_model(model.cfg.vision, data)
        out[m] = grounding_scores(model, entries, masks, data, loader, tok)
    return out


def _overlays(runs, data: Path, out: Path) -> List[Any]:
    """Patches kept for different questions about the same test image, by TRIPS (text-guided) and EViT."""
    import torch

    from .data.images import ImageLoader
    from .viz.overlay import patch_status, save_comparison, trace_records
    from .viz.report import Figure

    entries = json.loads((data / "vqa_test.json").read_text())
    by_image: Dict[str, List[Dict[str, Any]]] = {}
    for e in entries:
        if e.get("objects"):
            by_image.setdefault(e["image"], []).append(e)
    # an image with questions about different objects
    pick = None
    for img, qs in by_image.items():
        distinct = {tuple(q["objects"]): q for q in qs}
        if len(distinct) >= 2:
            pick = (img, list(distinct.values())[:3])
            break
    if pick is None:
        return []
    figures = []
    for m in ("trips", "evit"):
        if ("vqa", m) not in runs:
            continue
        model, tok = _load_run(runs[("vqa", m)])
        loader = ImageLoader.for_model(model.cfg.vision, data)
        image = loader(pick[0])
        rows = []
        for q in pick[1]:
            ids, mask = tok.encode([q["question"]], model.cfg.text.max_len)
            with torch.inference_mode():
                o = model(image[None], ids, mask, trace=True)
            rows.append((q["question"], patch_status(trace_records(model, o))))
        path = out / f"overlay_{m}.png"
        from PIL import Image

        raw = Image.open(data / pick[0]).convert("RGB")
        import numpy as np

        save_comparison(np.asarray(raw), rows, path, title=f"{m}: patches kept for different questions")
        figures.append(Figure(path, f"{m}: kept (clear), fused (blue) and dropped (dark) patches, per question"))
    return figures


COLUMNS = [
    ("method", "method", ""), ("setup", "setup", ""), ("vqa_acc", "VQA acc", ".1f"), ("r_mean", "retrieval r_mean", ".1f"),
    ("gflops_image", "image GFLOPs", ".3f"), ("image_tokens", "image tokens", ".1f"),
    ("throughput", "pairs/s", ".0f"), ("speedup", "speed-up", ".2f"),
    ("ground_prec", "grounding prec.", ".3f"), ("ground_rec", "grounding recall", ".3f"),
]


def _write_report(out: Path, rows, figures, plan: Plan, pt_log: str, quick: bool, seconds: float) -> Path:
    from .viz.plots import plot_tradeoff
    from .viz.report import Figure, write_report

    fig = []
    tuned = [r for r in rows if r["setup"] == "fine-tuned with it"]
    if any(r.get("throughput") for r in tuned):
        p = plot_tradeoff(tuned, out / "tradeoff_vqa.png", x="throughput", y="vqa_acc",
                          xlabel="pairs/s (CPU, batch %d)" % plan.bench_batch, ylabel="VQA accuracy (%)",
                          title="VQA accuracy vs throughput")
        fig.append(Figure(p, "VQA accuracy against measured throughput, one point per method"))
        p = plot_tradeoff(tuned, out / "tradeoff_retrieval.png", x="throughput", y="r_mean",
                          xlabel="pairs/s (CPU, batch %d)" % plan.bench_batch, ylabel="retrieval r_mean",
                          title="Retrieval r_mean vs throughput")
        fig.append(Figure(p, "Retrieval r_mean against measured throughput"))
    notes = [
        f"{'quick' if quick else 'full'} demo, {seconds / 60:.1f} min on {platform.processor() or platform.machine()} "
        f"({_cpus()} CPU threads), torch {_torch_version()}",
        f"scenes data: {plan.images} images (10% test); small model pre-trained {plan.pretrain_steps} steps; "
        f"each fine-tune {plan.finetune_steps} steps at batch {plan.batch_size}",
        pt_log,
        "retrieval: two-stage (ITC on text-free image features, then ITM re-ranking of the top "
        f"{plan.retrieval_k} with the text-guided tokens); r_mean = mean of R@1/5/10 both ways",
        "GFLOPs and image tokens: image encoder per example, counted by running the model; pairs/s and speed-up: "
        "whole model (image + text + fusion), measured in this run",
        "grounding: share of individually kept patches on the question's objects (precision) and share of those "
        "objects' patches kept (recall), VQA test questions; random gives the chance level",
        "settings: " + "; ".join(f"{m} {METHODS[m]}" for m in METHODS if m != "none"),
        "not in the demo: TiP (needs a teacher and two training stages: see README), LAPS, DynamicViT",
    ]
    md, _ = write_report(out, "vlprune demo: accuracy and cost of image-token reduction on scenes", rows,
                         COLUMNS, fig + figures, notes)
    return md


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _torch_version() -> str:
    import torch

    return torch.__version__


def _print_table(rows: Sequence[Dict[str, Any]]) -> None:
    from .viz.report import markdown_table

    print(markdown_table(rows, COLUMNS))
