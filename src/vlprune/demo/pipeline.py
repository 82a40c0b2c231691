"""``run_demo``: the stages of the demo in order, each cached under ``OUT/<stage>/`` (see ``stages``).

data -> [pretrain] -> vqa-none, vqa-<method> (fine-tuned with each method at the main keep), vqa-blind,
retrieval-none -> eval-vqa-* (the unpruned model with every method at every sweep keep, each fine-tuned run,
the blind run; grounding with each), eval-ret-* -> [refs -> caption (from retrieval-none) -> eval-caption,
eval-grounding (referring expressions, with the captioner or retrieval-none)] -> bench -> overlays -> report
(always rewritten).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .profiles import METHODS, Profile, get_profile, label, model_config, point, validate
from .stages import Stages

log = logging.getLogger(__name__)
MARKER = "demo.json"
# bump when what the grounding of an eval stage records changes (redoes the evaluations, not the training)
GROUNDING_RECORDS = 2


from ..runtime import available_cores  # noqa: E402,F401  (the demo's default threads; re-exported)


def _prepare_out(out: Path, overwrite: bool, say: Callable[[str], None]) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if overwrite and out.exists():
        from ..rundir import check_overwrite

        check_overwrite(out, "demo")  # only a demo run vlprune wrote (demo.json) is deleted
        say(f"--overwrite: deleting {out} and everything in it")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file() and (out / "report.md").is_file():
            raise FileExistsError(f"{out} holds the output of an older vlprune demo (no {MARKER}); delete it "
                                  "yourself, or choose another --out")
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists, is not empty and holds no demo run ({MARKER}); choose another "
                                  "--out")
        say(f"continuing the demo in {out}: finished stages with the same settings are kept (--overwrite starts over)")
    out.mkdir(parents=True, exist_ok=True)


class DemoLayout:
    """The names and settings of the stages, shared by the runner and the report."""

    def __init__(self, out: Path, prof: Profile):
        self.out, self.prof = out, prof
        self.data = out / "data"
        self.model_json = out / "model.json"
        self.cfg = model_config(prof)
        self._matched: Optional[Dict[float, Dict[str, Any]]] = None

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.out)

    def vqa_runs(self) -> List[tuple]:
        """(stage name, row, seed) of every VQA fine-tune."""
        rows = ["none"] + list(self.prof.tuned) + ["blind"]
        out = []
        for i, seed in enumerate(self.prof.seeds):
            for r in rows:
                if i == 0 or r in self.prof.seed_rows:
                    out.append((f"vqa-{r}" + ("" if i == 0 else f"-s{seed}"), r, seed))
        return out

    def sweep_points(self) -> List[tuple]:
        return [(m, f) for m in list(METHODS) + ["lowres"] for f in self.prof.sweep]

    def matched(self) -> Dict[float, Dict[str, Any]]:
        """Per matched keep: TRIPS's counted image GFLOPs there and the lowres image size nearest them."""
        if self._matched is None:
            from . import steps

            keeps = [k for k in self.prof.matched_keeps if k in self.prof.sweep]
            self._matched = steps.lowres_for_gflops(self.cfg, {k: point(self.prof, "trips", k, self.cfg) for k in keeps})
        return self._matched

    def extra_lowres(self) -> List[int]:
        """The lowres image sizes of the matched points that the sweep does not evaluate already, largest first."""
        swept = {point(self.prof, "lowres", f, self.cfg).options["image_size"] for f in self.prof.sweep}
        return sorted({m["size"] for m in self.matched().values()} - swept, reverse=True)

    def lowres_px(self, size: int):
        """(key, ReduceConfig, share of the patches it keeps) of lowres at image ``size``."""
        from ..reduce.registry import ReduceConfig

        v = self.cfg.vision
        return (f"lowres-px{size}", ReduceConfig("lowres", options={"image_size": size}),
                round((size / v.patch_size / v.grid) ** 2, 3))

    def weights(self) -> Dict[str, float]:
        """Every stage's rough cost, in training samples (measured ratios on CPU: an evaluated question costs
        about 0.35 of a trained sample, a grounding question 0.7, an ITM re-ranking pair 0.4, a benchmarked pair
        0.8), so that the overall progress bar's ETA means something."""
        p, sc = self.prof, self.prof.scenes
        test_images = max(2, round(sc.images * sc.test_fraction))
        questions = test_images * sc.questions_per_image
        ground = 0.7 * (p.grounding_questions or questions)
        ret_images = min(p.retrieval_images or test_images, test_images)
        # data: measured 2026-12-05 on 2 threads, 25 s for 6000 cells images (masks, card) = 0.6 trained samples each
        w: Dict[str, float] = {"data": (0.6 if sc.family == "cells" else 0.07) * sc.images, "baselines": 1.0,
                               "overlays": 10.0,
                               "retrieval-none": float(p.retrieval.steps * p.retrieval.batch_size),
                               "bench": 0.8 * (len(self.sweep_points()) + len(self.extra_lowres()) + 1)
                               * (p.bench_repeats + 1) * (p.bench_batch + 1)}
        if p.pretrain.steps:
            first = float(p.pretrain.steps * p.pretrain.batch_size)
            seeds = p.seeds if p.pretrain_task == "vqa" else p.seeds[:1]
            for i, seed in enumerate(seeds):
                tail = "" if i == 0 else f"-s{seed}"
                w["pretrain" + tail] = first
                if p.warmup.steps:
                    w["warmup" + tail] = float(p.warmup.steps * p.warmup.batch_size)
                for part in p.first_parts:
                    w[f"pretrain-{part.name}{tail}"] = float(part.recipe.steps * part.recipe.batch_size)
                if p.pretrain_task == "vqa" and (i == 0 or "blind" in p.seed_rows):
                    w["pretrain-blind" + tail] = first
                    if p.warmup.steps:
                        w["warmup-blind" + tail] = float(p.warmup.steps * p.warmup.batch_size)
                    for part in p.first_parts:
                        w[f"pretrain-{part.name}-blind{tail}"] = float(part.recipe.steps * part.recipe.batch_size)
        for m in p.learned:
            w[f"vqa-{m}"] = float(p.vqa.steps * p.vqa.batch_size) * 1.5  # + the teacher's forward passes
            w[f"eval-vqa-{m}"] = 0.35 * questions + (ground if m != "tip" else 0.0)
        for name, row, _ in self.vqa_runs():
            w[name] = float(p.vqa.steps * p.vqa.batch_size)
            if name != "vqa-none":
                w[f"eval-{name}"] = 0.35 * questions + (ground if row not in ("none", "blind") else 0.0)
        w["eval-vqa-none"] = 0.35 * questions + ground
        for m, f in self.sweep_points():
            w[f"eval-vqa-{m}-{label(f)}"] = 0.35 * questions + (ground if p.grounding_sweep or f == p.main_keep else 0)
        for size in self.extra_lowres():
            w[f"eval-vqa-{self.lowres_px(size)[0]}"] = 0.35 * questions
        for m in ("none",) + tuple(p.retrieval_methods):
            w[f"eval-ret-{m}"] = 0.4 * p.retrieval_k * 3 * ret_images  # image and caption queries (2 captions each)
        rows = 1 + len(METHODS) * len(p.task_keeps)
        if p.caption.steps or p.grounding_expressions >= 0:
            w["refs"] = 0.5 * sc.images  # reading every mask for the boxes: 22 s for 6000 images (2026-12-05)
        if p.caption.steps:  # measured (1 thread): a captioned image (beam 3) costs about 0.6 trained samples,
            w["caption"] = float(p.caption.steps * p.caption.batch_size)  # a grounded expression about 0.4
            w["eval-caption"] = 0.6 * (rows + 1) * min(p.caption_images or test_images, test_images)
        if p.grounding_expressions >= 0:
            w["eval-grounding"] = 0.4 * rows * (p.grounding_expressions or 4 * test_images)
        return w


def run_demo(out: Union[str, Path], profile: Union[str, Profile] = "default", overwrite: bool = False,
             threads: Optional[int] = None, quiet: bool = False, say: Optional[Callable[[str], None]] = None) -> Path:
    """Run (or continue) the demo in ``out``; returns the path of ``report.md``. ``say`` receives one line per
    stage event (default: logging at INFO); ``threads``: torch threads (default: the available cores)."""
    import torch

    prof = get_profile(profile) if isinstance(profile, str) else profile
    say = say or log.info
    threads = threads or available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    validate(prof)
    _check_extras(prof)
    out = Path(out)
    _prepare_out(out, overwrite, say)
    t_start = time.perf_counter()
    plan = DemoLayout(out, prof)
    (out / MARKER).write_text(json.dumps({"profile": prof.name}))
    from ..config import to_dict

    plan.model_json.write_text(json.dumps(to_dict(plan.cfg), indent=2))
    say(f"profile {prof.name}, {threads} torch thread(s), output {out}")
    st = Stages(out, plan.weights(), say, quiet)
    finished = False
    try:
        results = _run_stages(st, plan, not quiet)
        finished = True
    finally:
        st.close(finished)
    from .report import write_demo_report

    return write_demo_report(plan, results, st, threads, time.perf_counter() - t_start)


def _check_extras(prof: Profile) -> None:
    bad = [k for k in prof.matched_keeps if not (isinstance(k, (int, float)) and 0 < k <= 1)]
    if bad:
        raise ValueError(f"profile {prof.name}: matched_keeps must be in (0, 1], got {bad}")
    skipped = [k for k in prof.matched_keeps if k not in prof.sweep]
    if skipped:
        log.warning("profile %s: matched keeps %s are not in the sweep %s: no comparison at their GFLOPs", prof.name,
                    skipped, list(prof.sweep))
    q = prof.overlay_questions
    if isinstance(q, bool) or not isinstance(q, int) or not 2 <= q <= 6:
        raise ValueError(f"profile {prof.name}: overlay_questions must be an integer in 2..6, got {q!r}")
    for name, v, low in (("caption_images", prof.caption_images, 0), ("caption_beams", prof.caption_beams, 1),
                         ("grounding_expressions", prof.grounding_expressions, -1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"profile {prof.name}: {name} must be an integer >= {low}, got {v!r}")
    if prof.grounding_mode not in ("itm", "caption") or (prof.grounding_mode == "caption" and not prof.caption.steps
                                                          and prof.grounding_expressions >= 0):
        raise ValueError(f"profile {prof.name}: grounding_mode must be 'itm' or 'caption' (with caption.steps > 0), "
                         f"got {prof.grounding_mode!r} with caption.steps {prof.caption.steps}")
    bad = [k for k in prof.task_keeps if not (isinstance(k, (int, float)) and 0 < k <= 1)]
    if bad or not prof.task_keeps:
        raise ValueError(f"profile {prof.name}: task_keeps must be one or more keeps in (0, 1], got {list(prof.task_keeps)}")


def _train_settings(plan: DemoLayout, cfg, after: List[str]) -> Dict[str, Any]:
    from ..config import to_dict

    d = {k: (v.replace(str(plan.out), "OUT") if isinstance(v, str) else v) for k, v in to_dict(cfg).items()}
    return {"train": d, "model": plan.prof.model, "after": after}


def _train_cfg(plan: DemoLayout, task: str, recipe, seed: int, train_file: str, method=None, init: Optional[Path] = None,
               options: Optional[Dict[str, Any]] = None):
    from ..train import TrainConfig
    from . import steps

    return TrainConfig(task=task, train=str(plan.data / train_file), images=str(plan.data),
                       model=str(plan.model_json), init=None if init is None else str(init),
                       tokenizer=str(plan.data / steps.TOKENIZER) if init is None else None,
                       method=None if method is None else method.to_dict(), steps=recipe.steps,
                       batch_size=recipe.batch_size, lr=recipe.lr, warmup=recipe.warmup, lr_mult=recipe.lr_mult, seed=seed,
                       log_every=max(1, recipe.steps // 20), ckpt_every=plan.prof.ckpt_every,
                       task_options={**recipe.options, **(options or {})})


def _run_stages(st: Stages, plan: DemoLayout, progress: bool) -> Dict[str, Any]:
    from . import steps

    prof, data = plan.prof, plan.data
    size = plan.cfg.vision.image_size
    res: Dict[str, Any] = {"vqa": {}, "retrieval": {}, "train": {}}
    vocab = plan.cfg.text.vocab_size
    res["data"] = st.run("data", {"scenes": asdict(prof.scenes), "image_size": size, "tokenizer": vocab},
                         lambda d: steps.make_data(data, prof.scenes, size, vocab), keep_dir=True)
    answers = {"answers": str(data / "answer_list.json")}
    firsts: Dict[tuple, Path] = {}

    def first_stage(seed: int, blind: bool) -> Optional[Path]:
        """The first stage's run for ``seed`` (None without one); with a VQA first stage the blind row has its own."""
        if prof.pretrain.steps == 0:
            return None
        vqa_first = prof.pretrain_task == "vqa"
        blind = blind and vqa_first
        key = (seed if vqa_first else prof.seeds[0], blind)
        if key not in firsts:
            tail = ("-blind" if blind else "") + ("" if key[0] == prof.seeds[0] else f"-s{key[0]}")
            name = "pretrain" + tail
            if vqa_first:
                train_file = "vqa_train_blind.json" if blind else "vqa_train.json"
                warm = warmup_stage(key[0], train_file, tail) if prof.warmup.steps else None
                cfg = _train_cfg(plan, "vqa", prof.pretrain, key[0], train_file, None, warm, answers)
                up = [st.keys["data"]] + ([st.keys[warm.name]] if warm is not None else [])
                res["train"][name] = st.run(name, _train_settings(plan, cfg, up),
                                            lambda d: steps.train_run(d, cfg, progress), keep_dir=True)
                last = plan.out / name
                for part in prof.first_parts:
                    last = part_stage(part, key[0], train_file, tail, last)
                firsts[key] = last
                return firsts[key]
            else:
                cfg = _train_cfg(plan, "pretrain", prof.pretrain, key[0], "pretrain.json")
            res["train"][name] = st.run(name, _train_settings(plan, cfg, [st.keys["data"]]),
                                        lambda d: steps.train_run(d, cfg, progress), keep_dir=True)
            firsts[key] = plan.out / name
        return firsts[key]

    def subset_stage(name: str, suffix: str, recipe, seed: int, train_file: str, init: Optional[Path],
                     types: Tuple[str, ...], repeat: Optional[Dict[str, int]] = None) -> Path:
        """VQA on the questions of ``types`` of ``train_file`` (empty: all), each of type ``t`` ``repeat[t]`` times,
        from ``init`` (None: from scratch), with the whole answer list. The warm-up and each further part of the
        first stage are such stages."""
        sub = data / train_file.replace(".json", f"_{suffix}.json")  # beside the data: the run's own dir is its output
        cfg = _train_cfg(plan, "vqa", recipe, seed, sub.name, None, init, answers)

        def run(d: Path) -> Dict[str, Any]:
            rows = [e for e in json.loads((data / train_file).read_text()) if not types or e.get("type") in types]
            rows = [e for e in rows for _ in range((repeat or {}).get(e.get("type"), 1))]
            sub.write_text(json.dumps(rows))
            return {**steps.train_run(d, cfg, progress), "questions": len(rows)}

        settings = {**_train_settings(plan, cfg, after(init)), "types": list(types),
                    **({} if repeat is None else {"repeat": dict(repeat)}), "from": train_file}
        res["train"][name] = st.run(name, settings, run, keep_dir=True)
        return plan.out / name

    def part_stage(part, seed: int, train_file: str, tail: str, init: Path) -> Path:
        """A further part of the first stage, from the part before it."""
        return subset_stage(f"pretrain-{part.name}{tail}", part.name, part.recipe, seed, train_file, init, part.types,
                            part.repeat)

    def warmup_stage(seed: int, train_file: str, tail: str) -> Path:
        """The curriculum's first part: VQA from scratch on the warm-up question types only."""
        return subset_stage("warmup" + tail, "warmup", prof.warmup, seed, train_file, None, prof.warmup_types)

    def after(init: Optional[Path]) -> List[str]:
        return [st.keys["data"]] + ([st.keys[init.name]] if init is not None else [])

    for name, row, seed in plan.vqa_runs():
        method = None if row in ("none", "blind") else point(prof, row, prof.main_keep, plan.cfg)
        train_file = "vqa_train_blind.json" if row == "blind" else "vqa_train.json"
        init = first_stage(seed, row == "blind")
        cfg = _train_cfg(plan, "vqa", prof.vqa, seed, train_file, method, init, answers)
        res["train"][name] = st.run(name, _train_settings(plan, cfg, after(init)),
                                    lambda d, c=cfg: steps.train_run(d, c, progress), keep_dir=True)
    init = first_stage(prof.seeds[0], False)
    up = after(init)
    teacher = {"teacher": str(plan.out / "vqa-none")}
    for m, sched in prof.learned.items():  # the learned methods: their losses, distilled from the unpruned run
        from ..reduce.registry import ReduceConfig

        rc = ReduceConfig(m, layers=tuple(sched["layers"]), keep=sched["keep"])
        cfg = _train_cfg(plan, "vqa", prof.vqa, prof.seeds[0], "vqa_train.json", rc, init, {**answers, **teacher})
        res["train"][f"vqa-{m}"] = st.run(f"vqa-{m}", _train_settings(plan, cfg, up + [st.keys["vqa-none"]]),
                                          lambda d, c=cfg: steps.train_run(d, c, progress), keep_dir=True)
    cfg = _train_cfg(plan, "retrieval", prof.retrieval, prof.seeds[0], "retrieval_train.json", None, init)
    res["train"]["retrieval-none"] = st.run("retrieval-none", _train_settings(plan, cfg, up),
                                            lambda d: steps.train_run(d, cfg, progress), keep_dir=True)
    res["baselines"] = st.run("baselines", {"after": [st.keys["data"]], "retrieval_images": prof.retrieval_images},
                              lambda d: {**steps.vqa_baselines(data),
                                         "retrieval_chance": steps.retrieval_chance(data, prof.retrieval_images)})
    _vqa_evals(st, plan, res, progress)
    _retrieval_evals(st, plan, res, progress)
    _caption_grounding(st, plan, res, progress)
    extra = [plan.lowres_px(size) for size in plan.extra_lowres()]
    configs = [point(prof, m, f, plan.cfg) for m, f in plan.sweep_points()] + [rc for _, rc, _ in extra]
    rows = st.run("bench", {"configs": [c.to_dict() for c in configs], "batch": prof.bench_batch,
                            "repeats": prof.bench_repeats, "text_len": prof.bench_text_len, "model": prof.model},
                  lambda d: {"rows": steps.bench(plan.model_json, configs, prof, progress)})["rows"]
    keys = [f"{m}-{label(f)}" for m, f in plan.sweep_points()] + [k for k, _, _ in extra]
    res["bench"] = {"none": rows[0], **dict(zip(keys, rows[1:]))}
    # overlays: TRIPS and EViT fine-tuned with the method, else applied at inference to the unpruned model
    runs = {m: (f"vqa-{m}", "saved") if m in prof.tuned else ("vqa-none", point(prof, m, prof.main_keep, plan.cfg))
            for m in ("trips", "evit")}
    side = {m: ("vqa-none", point(prof, m, prof.main_keep, plan.cfg)) for m in ("none",) + tuple(METHODS)}
    res["overlays"] = st.run(
        "overlays", {"after": [st.keys[r] for r, _ in runs.values()], "questions": prof.overlay_questions,
                     "methods": {m: str(rc) for m, (_, rc) in runs.items()},
                     "side_by_side": {m: str(rc) for m, (_, rc) in side.items()}},
        lambda d: {"figures": [[plan.rel(Path(f.path)), f.caption] for f in steps.question_overlays(
            {m: (plan.out / r, rc) for m, (r, rc) in side.items()}, data, d, prof.overlay_questions) + steps.overlays(
            {m: (plan.out / r, rc) for m, (r, rc) in runs.items()}, data, d)]})
    return res


def _eval_stage(st: Stages, plan: DemoLayout, name: str, run: str, method, test_file: str, f: Optional[float],
                ground: bool, progress: bool) -> Dict[str, Any]:
    from . import steps

    prof, m = plan.prof, method  # m: "saved", None or a ReduceConfig
    settings = {"run": st.keys[run], "method": m if isinstance(m, str) or m is None else m.to_dict(),
                "test": test_file, "grounding": prof.grounding_questions if ground else None,
                "batch": prof.eval_batch, "grounding_records": GROUNDING_RECORDS if ground else None}

    def go(d: Path) -> Dict[str, Any]:
        r = steps.eval_vqa(plan.out / run, m, plan.data, test_file, prof.eval_batch, progress)
        (d / "predictions.json").write_text(json.dumps(r.pop("predictions")))
        if ground:
            r["grounding"] = steps.grounding(plan.out / run, m, plan.data, prof.grounding_questions, prof.eval_batch,
                                             progress)
        return r

    return {**st.run(name, settings, go), "keep": f, "run": run}


def _vqa_evals(st: Stages, plan: DemoLayout, res: Dict[str, Any], progress: bool) -> None:
    prof = plan.prof
    ev = res["vqa"]
    ev["none"] = {**_eval_stage(st, plan, "eval-vqa-none", "vqa-none", None, "vqa_test.json", 1.0, True, progress),
                  "method": "none", "setup": "fine-tuned unpruned"}
    for m, f in plan.sweep_points():
        ground = prof.grounding_sweep or f == prof.main_keep
        key = f"{m}-{label(f)}"
        ev[key] = {**_eval_stage(st, plan, f"eval-vqa-{key}", "vqa-none", point(prof, m, f, plan.cfg), "vqa_test.json",
                                 f, ground, progress), "method": m, "setup": "at inference"}
    for size in plan.extra_lowres():  # lowres at the size whose GFLOPs match TRIPS at a matched keep
        key, rc, f = plan.lowres_px(size)
        ev[key] = {**_eval_stage(st, plan, f"eval-vqa-{key}", "vqa-none", rc, "vqa_test.json", f, False, progress),
                   "method": "lowres", "setup": "at inference", "image_size": size}
    for name, row, seed in plan.vqa_runs():
        if row == "none" and seed == prof.seeds[0]:
            continue
        blind = row == "blind"
        test = "vqa_test_blind.json" if blind else "vqa_test.json"
        f = None if row in ("none", "blind") else prof.main_keep
        r = _eval_stage(st, plan, f"eval-{name}", name, "saved", test, f, not blind and row != "none", progress)
        setup = "blind" if blind else "fine-tuned unpruned" if row == "none" else "fine-tuned with it"
        ev[name] = {**r, "method": row, "seed": seed, "setup": setup}
    for m in prof.learned:  # TiP reduces in the fusion layers: no image-encoder patches to ground
        r = _eval_stage(st, plan, f"eval-vqa-{m}", f"vqa-{m}", "saved", "vqa_test.json", None, m != "tip", progress)
        ev[f"vqa-{m}"] = {**r, "method": m, "seed": prof.seeds[0], "setup": "fine-tuned with its losses"}


def _retrieval_evals(st: Stages, plan: DemoLayout, res: Dict[str, Any], progress: bool) -> None:
    from . import steps

    prof = plan.prof
    for m in ["none"] + list(prof.retrieval_methods):
        rc = point(prof, m, prof.main_keep, plan.cfg)
        settings = {"run": st.keys["retrieval-none"], "method": None if rc is None else rc.to_dict(),
                    "k": prof.retrieval_k, "batch": prof.eval_batch, "images": prof.retrieval_images}
        r = st.run(f"eval-ret-{m}", settings, lambda d, rc=rc: steps.eval_retrieval(
            plan.out / "retrieval-none", rc, plan.data, prof.retrieval_k, prof.eval_batch, progress,
            prof.retrieval_images))
        res["retrieval"][m] = {**r, "keep": None if rc is None else prof.main_keep}


def _task_points(plan: DemoLayout) -> List[tuple]:
    """(method, keep, ReduceConfig) of the captioning and grounding rows: every method at every task keep."""
    return [(m, f, point(plan.prof, m, f, plan.cfg)) for m in METHODS for f in plan.prof.task_keeps]


def _caption_grounding(st: Stages, plan: DemoLayout, res: Dict[str, Any], progress: bool) -> None:
    """Captioning (a training stage of its own, from retrieval-none) and the grounding of the scenes' referring
    expressions (Grad-CAM of retrieval-none's ITM score, or of the captioner's likelihood of the expression): the
    unpruned model, each method at the task keeps and the baselines, each row with its 95% interval
    (``tasks.caption_rows``)."""
    from ..data.scenes_refs import write_scenes_refs
    from ..tasks.caption_rows import caption_rows, grounding_rows
    from . import steps

    prof = plan.prof
    if not prof.caption.steps and prof.grounding_expressions < 0:
        return
    st.run("refs", {"after": [st.keys["data"]]}, lambda d: write_scenes_refs(plan.data))
    pts = _task_points(plan)
    methods = [None] + [rc for _, _, rc in pts]
    keeps = [{"keep": None}] + [{"method": m, "keep": f} for m, f, _ in pts]
    configs = [rc.to_dict() for _, _, rc in pts]
    ret = plan.out / "retrieval-none"
    if prof.caption.steps:
        ccfg = _train_cfg(plan, "caption", prof.caption, prof.seeds[0], "caption_train.json", None, ret)
        res["train"]["caption"] = st.run(
            "caption", _train_settings(plan, ccfg, [st.keys["refs"], st.keys["retrieval-none"]]),
            lambda d: steps.train_run(d, ccfg, progress), keep_dir=True)
        settings = {"run": st.keys["caption"], "methods": configs, "images": prof.caption_images,
                    "beams": prof.caption_beams, "n_boot": prof.n_boot, "batch": prof.eval_batch,
                    "metric_tokenizer": prof.caption_metric_tokenizer}
        # text-guided methods (TRIPS, ELIP) are guided by the prompt's text [CLS]; image-only ones ignore it
        rows = st.run("eval-caption", settings, lambda d: {"rows": caption_rows(
            plan.out / "caption", methods, str(plan.data / "caption_test.json"), str(plan.data),
            batch_size=prof.eval_batch, n_boot=prof.n_boot, limit=prof.caption_images, num_beams=prof.caption_beams,
            guide="prompt", tokenizer=prof.caption_metric_tokenizer)})["rows"]
        res["caption"] = [{**r, **k} for r, k in zip(rows, keeps + [{"keep": None}])]
    if prof.grounding_expressions >= 0:
        if prof.grounding_mode == "caption":  # Grad-CAM of the captioner's likelihood of the expression
            ret = plan.out / "caption"
        settings = {"run": st.keys[ret.name], "after": [st.keys["refs"]], "methods": configs,
                    "expressions": prof.grounding_expressions, "layer": prof.grounding_layer, "n_boot": prof.n_boot,
                    "batch": prof.eval_batch, "mode": prof.grounding_mode}
        rows = st.run("eval-grounding", settings, lambda d: {"rows": grounding_rows(
            ret, methods, str(plan.data / "grounding_test.json"), str(plan.data), batch_size=prof.eval_batch,
            n_boot=prof.n_boot, limit=prof.grounding_expressions, layer=prof.grounding_layer,
            mode=prof.grounding_mode)})["rows"]
        res["grounding_refs"] = [{**r, **k} for r, k in zip(rows, keeps + [{"keep": None}])]


__all__ = ["run_demo", "available_cores", "MARKER"]
