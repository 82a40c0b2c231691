"""A recipe's plan: per stage the data files, the model and method, the steps, the checkpoints it writes and
reads, and its cost; printed by ``vlprune reproduce NAME --dry-run``.

Sample counts come from ``DATA/NAME/prepared.json`` where the data are prepared, else from the full release's
published counts (``vlprune.prepare.TARGETS``), so a plan can be made before anything is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import cost


@dataclass
class StagePlan:
    name: str
    task: str
    runnable: bool
    why: str = ""
    train: List[Tuple[str, int, str]] = field(default_factory=list)  # (DATA/SPLIT, samples, "prepared" | "release")
    val: Optional[str] = None
    answers: Optional[str] = None
    init: Optional[str] = None  # "stage:NAME", "checkpoint" or None
    image_size: int = 0
    epochs: int = 0
    batch: int = 0  # global
    steps: int = 0
    warmup: int = 0
    method: Optional[Dict[str, Any]] = None
    out: str = ""
    cost: Dict[str, Any] = field(default_factory=dict)
    spec: Dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(n for _, n, _ in self.train)


def split_count(data: Optional[Path], ref: str) -> Tuple[int, str]:
    """Samples of ``DATA/SPLIT`` (``coco/train``; a mixture such as ``pretrain-4m``: its train split) and where
    the number comes from."""
    from ..prepare import TARGETS

    target, _, split = ref.partition("/")
    split = split or "train"
    if target not in TARGETS:
        raise ValueError(f"recipe data {ref!r}: unknown data set {target!r}; valid: {', '.join(TARGETS)}")
    if data is not None and (data / target / "prepared.json").is_file():
        state = json.loads((data / target / "prepared.json").read_text(encoding="utf-8"))
        if split in state["splits"]:
            return int(state["splits"][split]["entries"]), "prepared"
    n = TARGETS[target].split(split).expected[0]
    if n is None:  # a mixture: the sum of its parts' published counts
        from ..prepare.pretrain import MIXES

        n = sum(TARGETS[p].split("train").expected[0] or 0 for p in MIXES.get(target, ()))
    return int(n), "release"


def method_dict(recipe: Dict[str, Any], stage: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    if "method" in stage:
        return stage["method"]
    return recipe.get("method")


def reduce_config(m: Optional[Dict[str, Any]], miniature: bool):
    """The stage's ReduceConfig; in a miniature run the layers and keep of the paper's depth are left to the
    method's defaults for the miniature model's depth."""
    from ..reduce.registry import ReduceConfig

    if m is None:
        return None
    if miniature:
        return ReduceConfig(m["name"])
    keep = m.get("keep")
    return ReduceConfig(m["name"], layers=tuple(m["layers"]) if m.get("layers") else None,
                        keep=tuple(keep) if isinstance(keep, list) else keep, options=m.get("options", {}))


def make_plan(recipe: Dict[str, Any], data: Optional[Path], out: Path, model_cfg, world: int = 1,
              max_steps: Optional[int] = None, mfu: float = cost.MFU, with_cost: bool = True) -> List[StagePlan]:
    """The stages of ``recipe``; ``model_cfg``: the model the stages train (the recipe's preset, or a miniature
    override when ``max_steps`` is set); ``world``: processes sharing the global batch."""
    from ..config import override

    plans = []
    for s in recipe["stages"]:
        p = StagePlan(s["name"], s["task"], s.get("runnable", True), s.get("why", ""), spec=s, out=str(out / s["name"]))
        plans.append(p)
        if not p.runnable:
            continue
        p.train = [(ref, *split_count(data, ref)) for ref in s["train"]]
        p.val, p.answers, p.init = s.get("val"), s.get("answers"), s.get("init")
        p.image_size, p.epochs, p.batch = s["image_size"], s["epochs"], s["batch"]
        p.method = method_dict(recipe, s)
        if p.batch % world:
            raise ValueError(f"stage {p.name}: global batch {p.batch} does not split over {world} processes")
        p.steps = cost.steps_for(p.samples, p.epochs, p.batch) if max_steps is None else max_steps
        p.warmup = int(s.get("warmup_steps", round(s.get("warmup_fraction", 0.0) * p.steps)))
        if with_cost and max_steps is None:
            cfg = override(model_cfg, **{"vision.image_size": p.image_size})
            p.cost = cost.stage_cost(p.task, cfg, reduce_config(p.method, False), p.samples, p.epochs, mfu)
    return plans


def _method_text(m: Optional[Dict[str, Any]]) -> str:
    if m is None:
        return "none"
    parts = [m["name"]]
    if m.get("layers"):
        parts.append("layers " + ",".join(map(str, m["layers"])))
    if m.get("keep") is not None:
        keep = m["keep"]
        parts.append("keep " + (",".join(map(str, keep)) if isinstance(keep, list) else str(keep)))
    parts += [f"{k}={v}" for k, v in m.get("options", {}).items()]
    return " ".join(parts)


def format_plan(recipe: Dict[str, Any], plans: List[StagePlan], hardware: Tuple[str, int, Optional[float]],
                mfu: float = cost.MFU, miniature: bool = False) -> str:
    """The dry-run text: stages, data, steps, checkpoints and estimated time."""
    name, gpus, peak = hardware
    lines = [f"recipe {recipe['name']}: {recipe['title']}", f"  paper: {recipe['paper']}",
             f"  model: {recipe['model']}; method: {_method_text(recipe.get('method'))}",
             f"  settings from: {recipe.get('settings_source', '-')}"]
    total_ref = 0.0
    for i, p in enumerate(plans, 1):
        lines.append(f"stage {i}/{len(plans)} {p.name} ({p.task})")
        if not p.runnable:
            lines.append(f"  not runnable here: {p.why}")
            continue
        for ref, n, src in p.train:
            where = "prepared" if src == "prepared" else "full release, not prepared yet"
            lines.append(f"  train {ref}: {n:,} samples ({where})")
        if p.val:
            lines.append(f"  evaluate after training: {p.val}")
        if p.answers:
            lines.append(f"  answers: {p.answers}")
        init = p.init or "from scratch"
        if p.init == "checkpoint":
            init = "the --init checkpoint"
        elif p.init:
            init = f"the model of stage {p.init[6:]} ({Path(p.out).parent / p.init[6:]})"
        lines.append(f"  init: {init}; method: {_method_text(p.method)}")
        s = p.spec
        lines.append(f"  image {p.image_size}px, {p.epochs} epoch(s), global batch {p.batch}, {p.steps:,} steps"
                     f"{' (--max-steps)' if miniature else ''}, warm-up {p.warmup} steps, lr {s['lr']:g} -> "
                     f"{s.get('min_lr', 0.1 * s['lr']):g} (cosine), weight decay {s.get('weight_decay', 0.02)}"
                     + (f", grad clip {s['grad_clip']}" if s.get("grad_clip") else ""))
        lines.append(f"  writes {p.out}/ (checkpoint-STEP/, latest, model/, metrics.jsonl)")
        if s.get("note"):
            lines.append(f"  note: {s['note']}")
        if p.cost:
            c = p.cost
            total_ref += c["ref_gpu_hours"]
            lines.append(f"  cost: {c['forward_gflops']:.1f} GFLOPs forward, {c['train_gflops_per_sample']:.0f} GFLOPs "
                         f"per training sample, {c['total_flops']:.2e} FLOPs, {c['ref_gpu_hours']:,.1f} "
                         f"{cost.REFERENCE_GPU}-hours at MFU {mfu:g}")
    if not miniature:
        lines.append(f"total: {total_ref:,.1f} {cost.REFERENCE_GPU}-hours at MFU {mfu:g} (training only; "
                     "estimated from FLOPs, see docs/reproduce.md)")
        if peak and gpus:
            hours = total_ref * cost.peak_flops(cost.REFERENCE_GPU) / peak / gpus
            lines.append(f"on this machine ({gpus} x {name}): about {hours:,.1f} h wall-clock")
        else:
            lines.append(f"on this machine ({name}{', unknown peak' if gpus else ''}): no estimate; the "
                         f"{cost.REFERENCE_GPU} figure above is for one GPU (divide by the GPU count)")
    return "\n".join(lines)
