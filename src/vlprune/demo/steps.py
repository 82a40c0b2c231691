"""What the demo's stages do, through the Python API: the data (and its blind copy), training runs (resumed
after an interruption; the optimiser checkpoint deleted once finished), VQA and retrieval evaluations with
per-question scores, grounding (does the asked-about object survive selection?) and the throughput benchmark.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..tasks.evaluation import evaluate_run, load_run

log = logging.getLogger(__name__)
TOKENIZER = "tokenizer"
BLIND_IMAGE = "blind.png"


def make_data(d: Path, scenes, image_size: int, vocab_size: int) -> Dict[str, Any]:
    """Scenes data in ``d``, plus the blind copy (one mid-grey image and VQA files whose images all point to it)
    and one tokenizer for every run (``d/tokenizer``), built from the training captions and questions together:
    a tokenizer built from one task's text alone (colour questions) would split the words only the other task
    uses (the captions' colour names and relations) into characters, and the retrieval run that starts from the
    VQA model would inherit it."""
    from PIL import Image

    from ..data.tokenizer import TextTokenizer

    from ..data.scenes import generate

    summary = generate(d, images=scenes.images, seed=scenes.seed, image_size=image_size,
                       min_objects=scenes.min_objects, max_objects=scenes.max_objects,
                       test_fraction=scenes.test_fraction, questions_per_image=scenes.questions_per_image,
                       object_scale=scenes.object_scale, question_types=scenes.question_types,
                       family=scenes.family, grid=scenes.grid)
    Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(d / BLIND_IMAGE)
    for part in ("train", "test"):
        entries = json.loads((d / f"vqa_{part}.json").read_text())
        (d / f"vqa_{part}_blind.json").write_text(json.dumps([{**e, "image": BLIND_IMAGE} for e in entries]))
    texts = [e["caption"] for e in json.loads((d / "pretrain.json").read_text())]
    texts += [e["question"] for e in json.loads((d / "vqa_train.json").read_text())]
    TextTokenizer.train(texts, vocab_size).save(d / TOKENIZER)
    return summary


def train_run(d: Path, cfg, progress: bool) -> Dict[str, Any]:
    """``vlprune.train.train`` into ``d``: resumed when ``d`` holds a checkpoint of the same config, else fresh.
    Raises KeyboardInterrupt when the run was stopped by a signal (its checkpoint stays for the next run)."""
    from dataclasses import replace

    from ..checkpoint import has_checkpoint, remove_checkpoints
    from ..config import to_dict
    from ..train import CONFIG_FILE, train

    cfg = replace(cfg, progress=progress)
    saved = d / CONFIG_FILE
    resume = has_checkpoint(d) and saved.is_file() and _same_run(json.loads(saved.read_text()), to_dict(cfg))
    if resume:
        log.info("resuming %s from its checkpoint", d)
    res = train(cfg, d, resume=resume, overwrite=not resume)
    if res["interrupted"]:
        raise KeyboardInterrupt(f"training in {d} was interrupted; run the demo again to continue it")
    remove_checkpoints(d)  # the optimiser state is not needed once the run is finished: keep model/ and tokenizer/
    return {"steps": res["steps"], "first": res["first"], "last": res["last"]}


def _same_run(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    skip = {"progress", "log_every", "ckpt_every", "threads"}  # threads: the saved config records the resolved count
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def eval_vqa(run: Path, method: Any, data: Path, test_file: str, batch: int, progress: bool) -> Dict[str, Any]:
    """VQA accuracy, per-question scores (0..1, test-file order), image GFLOPs and tokens of ``run`` with
    ``method`` at inference ("saved" = the method it was trained with, None = none), measured by
    ``tasks.evaluation.evaluate_run``: the path ``vlprune eval`` takes."""
    r = evaluate_run(run, "vqa", data / test_file, method=method, batch_size=batch, progress=progress)
    return {"accuracy": r.metrics["accuracy"], "scores": r.scores(), "gflops": r.info["gflops"],
            "image_tokens": r.info["image_tokens"], "examples": len(r.entries), "predictions": r.records()}


def eval_retrieval(run: Path, method: Any, data: Path, k: int, batch: int, progress: bool,
                   limit: int = 0) -> Dict[str, Any]:
    """Two-stage retrieval on the first ``limit`` test images (0 = all) with ``method`` at inference, measured by
    ``tasks.evaluation.evaluate_run``."""
    r = evaluate_run(run, "retrieval", data / "retrieval_test.json", method=method, batch_size=batch,
                     task_options={"k": k}, limit=limit, progress=progress)
    return {**r.metrics, "gflops": r.info["gflops"], "image_tokens": r.info["image_tokens"],
            "images": len(r.entries), "captions": r.info.get("captions")}


def retrieval_chance(data: Path, limit: int = 0) -> float:
    """Expected r_mean (percent) of a random ranking of the retrieval test set (its first ``limit`` images, 0 =
    all): R@1/5/10 both ways."""
    from ..stats import chance_recall

    entries = json.loads((data / "retrieval_test.json").read_text())
    entries = entries[:limit] if limit else entries
    n_img, n_txt = len(entries), sum(len(e["caption"]) for e in entries)
    vals = []
    for k in (1, 5, 10):
        vals.append(np.mean([chance_recall(k, n_txt, len(e["caption"])) for e in entries]))  # image -> text
        vals.append(chance_recall(k, n_img))  # text -> image
    return 100.0 * float(np.mean(vals))


def vqa_baselines(data: Path) -> Dict[str, Any]:
    """Uniform guessing over the answer list (expected score) and the training set's majority answer."""
    from ..tasks.metrics import vqa_score

    answers = json.loads((data / "answer_list.json").read_text())
    train = json.loads((data / "vqa_train.json").read_text())
    test = json.loads((data / "vqa_test.json").read_text())
    majority = Counter(a for e in train for a in e["answer"]).most_common(1)[0][0]
    uniform = [float(np.mean([vqa_score(a, e["answer"]) for a in answers])) for e in test]
    return {"answers": len(answers), "majority_answer": majority, "uniform_scores": uniform,
            "majority_scores": [vqa_score(majority, e["answer"]) for e in test]}


def grounding(run: Path, method: Any, data: Path, limit: int, batch: int, progress: bool = False) -> Dict[str, Any]:
    """``tasks.grounding.grounding_scores`` of ``run`` with ``method`` on the VQA test questions that name their
    objects (the first ``limit``; 0 = all): survival, precision, recall, relevance lift, question sensitivity,
    with the per-question records and the pairs' IoUs."""
    from ..data.images import ImageLoader
    from ..tasks.grounding import grounding_scores

    model, tok, _ = load_run(run, method)
    masks = {s["image"]: s["mask"] for s in json.loads((data / "scenes.json").read_text())["scenes"]}
    entries = [e for e in json.loads((data / "vqa_test.json").read_text()) if e.get("objects") and e["image"] in masks]
    entries = entries[:limit] if limit else entries
    return grounding_scores(model, entries, masks, data, ImageLoader.for_model(model.cfg.vision, data), tok, batch,
                            progress)


def lowres_for_gflops(cfg, targets: Dict[str, Any]) -> Dict[str, Any]:
    """For each target (name -> ReduceConfig on the model ``cfg``), the ``lowres`` image size (a patch multiple)
    whose counted image-encoder GFLOPs are nearest the target's; counted on a random-weights model (token counts,
    hence FLOPs, do not depend on the weights). Returns {name: {"gflops", "size", "size_gflops"}}."""
    from ..models.build import attach, build_model
    from ..reduce.registry import ReduceConfig
    from ..tasks.evaluation import image_encoder_gflops

    v = cfg.vision
    model = build_model(cfg).eval()
    ids = torch.ones(1, 8, dtype=torch.long)
    images = torch.rand(1, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(0))

    def count(rc) -> float:
        attach(model, rc)
        return image_encoder_gflops(model, images, ids, torch.ones_like(ids))

    sizes = {g * v.patch_size: count(ReduceConfig("lowres", options={"image_size": g * v.patch_size}))
             for g in range(1, v.grid + 1)}
    out = {}
    for name, rc in targets.items():
        g = count(rc)
        size = min(sizes, key=lambda s: (abs(sizes[s] - g), -s))
        out[name] = {"gflops": g, "size": size, "size_gflops": sizes[size]}
    attach(model, None)
    return out


def bench(model_json: Path, configs: Sequence[Any], profile, progress: bool = False) -> List[Dict[str, Any]]:
    """``run_bench`` rows for ``configs`` (ReduceConfigs) on the profile's model (random weights), in order;
    the first row is ``none``."""
    from tqdm import tqdm

    from ..bench.runner import BenchSettings, run_bench

    s = BenchSettings(model=str(model_json), text_len=profile.bench_text_len, batch_size=profile.bench_batch,
                      repeats=profile.bench_repeats)
    # one step per configuration counted, then the throughput and the latency rounds
    bar = tqdm(total=len(configs) + 3, desc="bench", unit="step", disable=not progress, dynamic_ncols=True)

    def tick(msg: str) -> None:
        log.debug("bench: %s", msg)
        if msg.startswith(("[", "timing")):
            bar.update(1)

    try:
        rows = run_bench(s, list(configs), progress=tick)
    finally:
        bar.close()
    keep = ("method", "label", "gflops_image", "gflops_total", "throughput", "speedup", "latency_ms", "batch_size",
            "tokens_per_layer", "ideal_speedup")
    return [{k: r.get(k) for k in keep} for r in rows]


def overlays(runs: Dict[str, Any], data: Path, out: Path) -> List[Any]:
    """Patches kept for different questions about the same test image: ``runs`` maps a name to (run directory,
    method at inference or "saved")."""
    from PIL import Image

    from ..data.images import ImageLoader
    from ..viz.overlay import patch_status, save_comparison, trace_records
    from ..viz.report import Figure

    by_image: Dict[str, Dict[tuple, Dict[str, Any]]] = {}
    for e in json.loads((data / "vqa_test.json").read_text()):
        if e.get("objects"):
            by_image.setdefault(e["image"], {}).setdefault(tuple(e["objects"]), e)
    pick = next(((img, list(qs.values())[:3]) for img, qs in by_image.items() if len(qs) >= 2), None)
    if pick is None:
        return []
    figures = []
    raw = np.asarray(Image.open(data / pick[0]).convert("RGB"))
    for name, (run, method) in runs.items():
        model, tok, _ = load_run(run, method)
        image = ImageLoader.for_model(model.cfg.vision, data)(pick[0])
        rows = []
        for q in pick[1]:
            ids, mask = tok.encode([q["question"]], model.cfg.text.max_len)
            with torch.inference_mode():
                o = model(image[None], ids, mask, trace=True)
            rows.append((q["question"], patch_status(trace_records(model, o))))
        path = out / f"overlay_{name}.png"
        save_comparison(raw, rows, path, title=f"{name}: patches kept for different questions")
        how = "fine-tuned with it" if method == "saved" else "applied at inference to the unpruned model"
        figures.append(Figure(path, f"{name} ({how}): kept (clear), fused (blue) and dropped (dark) patches, per "
                                    "question about the same image"))
    return figures



def pick_questions(entries: Sequence[Dict[str, Any]], n: int) -> Optional[tuple]:
    """(image, up to ``n`` questions about different object sets of it, of different types first): the first
    image with the most such questions (at least 2); None when no image has two."""
    by: Dict[str, Dict[tuple, Dict[str, Any]]] = {}
    for e in entries:
        if e.get("objects"):
            by.setdefault(e["image"], {}).setdefault(tuple(sorted(e["objects"])), e)
    best = max(by.items(), key=lambda kv: min(len(kv[1]), n), default=None)
    if best is None or len(best[1]) < 2:
        return None
    qs = sorted(best[1].values(), key=lambda q: str(q.get("type")))
    seen, first, rest = set(), [], []
    for q in qs:
        (rest if q.get("type") in seen else first).append(q)
        seen.add(q.get("type"))
    return best[0], (first + rest)[:n]


def question_overlays(runs: Dict[str, Any], data: Path, out: Path, n: int) -> List[Any]:
    """One test image under ``n`` questions about different objects, method by method side by side (each
    method's patches after its last reduction, the asked-about objects outlined). ``runs``: column name -> (run
    directory, method at inference)."""
    from PIL import Image

    from ..data.images import ImageLoader
    from ..viz.overlay import patch_status, save_question_grid
    from ..viz.report import Figure

    pick = pick_questions(json.loads((data / "vqa_test.json").read_text()), n)
    if pick is None:
        return []
    image_path, qs = pick
    scene = next(s for s in json.loads((data / "scenes.json").read_text())["scenes"] if s["image"] == image_path)
    raw = np.asarray(Image.open(data / image_path).convert("RGB"))
    labels = np.asarray(Image.open(data / scene["mask"]))
    panels: List[List[Any]] = [[] for _ in qs]
    for name, (run, method) in runs.items():
        model, tok, _ = load_run(run, method)
        image = ImageLoader.for_model(model.cfg.vision, data)(image_path)
        for r, q in enumerate(qs):
            ids, mask = tok.encode([q["question"]], model.cfg.text.max_len)
            with torch.inference_mode():
                o = model(image[None], ids, mask, trace=True)
            recs = [x for x in model.trace_records(o) if x[0] in ("vision", "joint")]
            panels[r].append(patch_status(recs)[-1] if recs else _all_kept(model.cfg.vision.grid))
    path = out / "overlay_questions.png"
    save_question_grid(raw, [(q["question"], np.isin(labels, q["objects"])) for q in qs], list(runs), panels, path,
                       title="the same image under different questions: patches after each method's last reduction")
    return [Figure(path, "One test image under different questions (rows), each method at the main keep applied at "
                         "inference to the unpruned model (columns): kept (clear), fused (blue), merged (orange) and "
                         "dropped (dark) patches; the asked-about objects outlined in green")]


def _all_kept(grid: int):
    from ..reduce.state import KEPT
    from ..reduce.trace import Panel

    return Panel("vision", 0, "none", grid * grid, np.full((grid, grid), KEPT), None)


__all__ = ["make_data", "train_run", "load_run", "eval_vqa", "eval_retrieval", "retrieval_chance", "vqa_baselines",
           "grounding", "lowres_for_gflops", "bench", "overlays", "pick_questions",
           "question_overlays", "BLIND_IMAGE"]
