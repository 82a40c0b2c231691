"""``run_protocols``: the planned stages (``protocols.plan``) run one at a time through the demo's resumable stage
machinery (``vlprune.demo.stages.Stages``: ``OUT/<stage>/done.json`` once finished; a killed run redoes only the
unfinished stage, and a training stage resumes from its last checkpoint), then the report.

A training stage also records what the tables and curves need: its training-loss records (``metrics.jsonl``),
the validation metric of every kept checkpoint (VQA accuracy, or retrieval r_mean for pre-training and retrieval,
on a validation set of its own scenes seed), its samples/s (median over the log intervals after the first), its
training wall time, and the memory of the tensors saved for backward in its first steps (the activations a token
reduction shrinks; on CUDA also the peak allocated memory).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

from .plan import Eval, Plan, Train, build_plan
from .profiles import ProtocolProfile, get_profile

log = logging.getLogger(__name__)
MARKER = "protocols.json"
TRAIN_FILES = {"pretrain": "pretrain.json", "vqa": "vqa_train.json", "retrieval": "retrieval_train.json"}
VAL = "val"  # the validation scenes, under OUT/data/val
PROBE_STEPS = 3  # optimiser steps whose saved-for-backward memory is measured


def run_protocols(out: Union[str, Path], protocols=(), profile: Union[str, ProtocolProfile] = "default",
                  overwrite: bool = False, threads: int = 1, quiet: bool = False,
                  say: Optional[Callable[[str], None]] = None) -> Path:
    """Run (or continue) ``protocols`` (default: all) in ``out``; returns the path of ``report.md``."""
    from ..demo.stages import Stages

    prof = get_profile(profile) if isinstance(profile, str) else profile
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    plan = build_plan(prof, protocols)
    say = say or log.info
    torch.set_num_threads(threads)
    out = Path(out)
    _prepare_out(out, overwrite, say)
    (out / MARKER).write_text(json.dumps({"profile": prof.name, "protocols": list(plan.protocols)}))
    for arch in ("albef", "vilt"):
        _model_json(out, prof, arch)
    say(f"profile {prof.name}, protocols {', '.join(plan.protocols)}, {threads} torch thread(s), output {out}")
    t0 = time.perf_counter()
    st = Stages(out, weights(plan), say, quiet)
    finished = False
    try:
        results = _run(st, plan, out, not quiet)
        finished = True
    finally:
        st.close(finished)
    from .report import write_report

    return write_report(out, plan, results, st.timings, threads, time.perf_counter() - t0)


def _prepare_out(out: Path, overwrite: bool, say: Callable[[str], None]) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists, is not empty and holds no protocols run ({MARKER}); choose another --out")
    if overwrite and out.exists():
        say(f"--overwrite: deleting {out} and everything in it")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        say(f"continuing in {out}: finished stages with the same settings are kept (--overwrite starts over)")
    out.mkdir(parents=True, exist_ok=True)


def _model_json(out: Path, prof: ProtocolProfile, arch: str) -> Path:
    from ..config import load_preset, override, to_dict

    path = out / f"model-{arch}.json"
    path.write_text(json.dumps(to_dict(override(load_preset("small"), **prof.model(arch))), indent=2))
    return path


# the cost of one unit of work relative to one trained sample of the unpruned two-stream model (measured on
# 1 thread, loaded machine, the default profile's model: 25 samples/s for VQA training)
COST = {"vqa": 1.0, "pretrain": 1.3, "retrieval": 1.3, "laps": 2.6, "teacher": 1.5, "question": 0.28,
        "itm_pair": 0.3, "laps_pair": 0.03}


def _eval_cost(kind: str, laps: bool, images: int, questions_per_image: int, k: int) -> float:
    """An evaluation's cost in trained samples: questions, ITM re-ranked pairs (k per query, two captions an
    image) or, for LAPS, every image-caption pair."""
    if kind == "vqa":
        return COST["question"] * images * questions_per_image
    return COST["laps_pair"] * images * images * 2 if laps else COST["itm_pair"] * k * images * 3


def weights(plan: Plan) -> Dict[str, float]:
    """Each stage's rough cost in trained samples (``COST``), so that the progress bar's ETA means something and
    ``estimate`` can state a budget."""
    prof = plan.prof
    sc = prof.scenes
    test = max(2, round(sc.images * sc.test_fraction))
    val = max(2, prof.val_images // 2)
    w: Dict[str, float] = {"data": 0.07 * (sc.images + prof.val_images)}
    for t in plan.trains.values():
        laps = (t.method or {}).get("name") == "laps"
        per = COST["laps" if laps else t.task] * (COST["teacher"] if t.teacher else 1.0)
        kind = "vqa" if t.task == "vqa" else "retrieval"
        w[t.name] = t.samples * per + prof.val_points * _eval_cost(kind, laps, val, sc.questions_per_image,
                                                                   prof.retrieval_k)
    for e in plan.evals.values():
        laps = (plan.trains[e.run].method or {}).get("name") == "laps"
        w[e.name] = _eval_cost(e.kind, laps, test, sc.questions_per_image, prof.retrieval_k)
    return w


def estimate(plan: Plan, samples_per_s: float) -> Dict[str, float]:
    """Expected seconds per protocol (a shared stage counted where it is first planned) and in all, at
    ``samples_per_s`` trained samples per second of the unpruned two-stream model."""
    w = weights(plan)
    out: Dict[str, float] = {"data": w["data"] / samples_per_s}
    seen: set = set()
    for r in plan.rows:
        for name in list(r.chain) + [r.eval]:
            if name not in seen:
                seen.add(name)
                out[r.protocol] = out.get(r.protocol, 0.0) + w[name] / samples_per_s
    out["total"] = sum(out.values())
    return out


def _run(st, plan: Plan, out: Path, progress: bool) -> Dict[str, Any]:
    from ..demo import steps

    prof = plan.prof
    data = out / "data"
    size = prof.scenes.image_size
    vocab = _vocab(prof)
    val_scenes = replace(prof.scenes, images=prof.val_images, seed=prof.scenes.seed + 1000, test_fraction=0.5)

    def make(d: Path) -> Dict[str, Any]:
        summary = steps.make_data(d, prof.scenes, size, vocab)
        steps.make_data(d / VAL, val_scenes, size, vocab)
        return {"train_images": summary.get("train_images"), "test_images": summary.get("test_images"),
                "summary": summary}

    res: Dict[str, Any] = {"data": st.run("data", {"scenes": asdict(prof.scenes), "val": asdict(val_scenes),
                                                  "image_size": size, "vocab": vocab}, make, keep_dir=True),
                           "train": {}, "eval": {}}
    for t in plan.trains.values():
        cfg = train_config(out, prof, t)
        after = [st.keys["data"]] + [st.keys[n] for n in (t.init, t.teacher) if n is not None]
        settings = {"stage": asdict(t), "model": prof.model(t.arch), "val": [prof.val_points, prof.retrieval_k],
                    "after": after}
        res["train"][t.name] = st.run(t.name, settings, lambda d, t=t, c=cfg: train_stage(d, t, c, prof, progress),
                                      keep_dir=True)
    for e in plan.evals.values():
        settings = {"run": st.keys[e.run], "kind": e.kind, "k": prof.retrieval_k, "batch": prof.eval_batch}
        res["eval"][e.name] = st.run(e.name, settings, lambda d, e=e: eval_stage(out, e, prof, progress))
    return res


def _vocab(prof: ProtocolProfile) -> int:
    from ..config import load_preset, override

    return override(load_preset("small"), **prof.model()).text.vocab_size


def train_config(out: Path, prof: ProtocolProfile, t: Train):
    from ..demo import steps
    from ..train import TrainConfig

    data = out / "data"
    opts: Dict[str, Any] = dict(t.options)
    if t.task == "vqa":
        opts["answers"] = str(data / "answer_list.json")
    if t.teacher is not None:
        opts["teacher"] = str(out / t.teacher)
    if t.task == "retrieval":
        opts.setdefault("k", prof.retrieval_k)
    return TrainConfig(task=t.task, train=str(data / TRAIN_FILES[t.task]), images=str(data),
                       model=str(out / f"model-{t.arch}.json"), init=None if t.init is None else str(out / t.init),
                       tokenizer=str(data / steps.TOKENIZER) if t.init is None else None, method=t.method,
                       steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                       log_every=max(1, t.steps // 20), ckpt_every=max(1, t.steps // prof.val_points),
                       save_total_limit=prof.val_points + 2, task_options=opts,
                       # recorded as the run saves it, so that the resume check below finds the same config
                       threads=torch.get_num_threads())


class SavedMemory:
    """Bytes of the tensors autograd saves for backward, per optimiser step (each storage counted once), over
    the first ``steps`` steps: a hook pair for ``torch.autograd.graph.saved_tensors_hooks``."""

    def __init__(self, steps: int = PROBE_STEPS):
        self.left, self.current, self.peak = steps, 0, 0
        self.seen: set = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.left > 0:
            s = t.untyped_storage()
            if s.data_ptr() not in self.seen:
                self.seen.add(s.data_ptr())
                self.current += s.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def step(self, *_: Any) -> None:
        if self.left > 0:
            self.peak = max(self.peak, self.current)
            self.left -= 1
        self.current, self.seen = 0, set()


def train_stage(d: Path, t: Train, cfg, prof: ProtocolProfile, progress: bool) -> Dict[str, Any]:
    """Train ``cfg`` into ``d`` (resumed from its checkpoint when ``d`` holds one of the same config), score its
    checkpoints on the validation set, then delete them (model/ and tokenizer/ stay)."""
    from ..checkpoint import checkpoints, has_checkpoint, remove_checkpoints
    from ..config import to_dict
    from ..demo.steps import _same_run
    from ..train import CONFIG_FILE, train

    cfg = replace(cfg, progress=progress)
    saved = d / CONFIG_FILE
    resume = has_checkpoint(d) and saved.is_file() and _same_run(json.loads(saved.read_text()), to_dict(cfg))
    mem = SavedMemory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(mem.pack, mem.unpack):
        res = train(cfg, d, resume=resume, overwrite=not resume, callback=mem.step)
    seconds = time.perf_counter() - t0
    if res["interrupted"]:
        raise KeyboardInterrupt(f"training in {d} was interrupted; run the same command again to continue it")
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    rates = [r["samples_per_s"] for r in records[1:]] or [r["samples_per_s"] for r in records]
    val = [[step, val_metric(d, t, path, prof)] for step, path in checkpoints(d)]
    remove_checkpoints(d)
    return {"steps": res["steps"], "samples": t.samples, "train_seconds": seconds,
            "samples_per_s": statistics.median(rates) if rates else None,
            "saved_mib": mem.peak / 2 ** 20 if mem.peak else None,
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None,
            "loss": [[r["step"], r["loss"]] for r in records], "val": val,
            "val_metric": "accuracy" if t.task == "vqa" else "r_mean", "resumed": resume}


def val_metric(run: Path, t: Train, state_path: Path, prof: ProtocolProfile) -> float:
    """The validation metric (percent) of the checkpoint ``state_path`` of ``run``: VQA accuracy, or r_mean."""
    from ..checkpoint import STATE, read_state
    from ..data.images import ImageLoader
    from ..demo.steps import load_run
    from ..tasks.base import get_task
    from ..tasks.evaluation import evaluate

    model, tok, meta = load_run(run, "saved")
    model.load_state_dict(read_state(state_path / STATE if state_path.is_dir() else state_path)["model"])
    data = run.parent / "data" / VAL
    if t.task == "vqa":
        task, test = get_task("vqa"), "vqa_test.json"
        task.restore(meta, model)
    else:
        task, test = get_task("retrieval", k=prof.retrieval_k), "retrieval_test.json"
    metrics, _ = evaluate(task, model.eval(), task.load_test(data / test), ImageLoader.for_model(model.cfg.vision, data),
                          tok, prof.eval_batch)
    return float(metrics["accuracy"] if t.task == "vqa" else metrics["r_mean"])  # both in percent


def eval_stage(out: Path, e: Eval, prof: ProtocolProfile, progress: bool) -> Dict[str, Any]:
    """The test-set score of run ``e.run`` with the method it was trained with: VQA accuracy with per-question
    scores, or R@1/5/10 both ways with the gallery size (LAPS: also the tokens its similarity uses)."""
    from ..demo import steps

    data = out / "data"
    if e.kind == "vqa":
        r = steps.eval_vqa(out / e.run, "saved", data, "vqa_test.json", prof.eval_batch, progress)
        r.pop("predictions")
        return r
    r = steps.eval_retrieval(out / e.run, "saved", data, prof.retrieval_k, prof.eval_batch, progress)
    model = steps.load_run(out / e.run)[0]
    if getattr(model, "laps", None) is not None:  # LAPS slims after the image encoder: [CLS], aggregates, fused
        r["slimmed_tokens"] = float(2 + model.laps.num_aggr)
    return r


__all__ = ["run_protocols", "train_config", "train_stage", "eval_stage", "val_metric", "SavedMemory", "weights", "estimate", "COST",
           "MARKER"]
