"""The stages of each protocol and the rows of its tables, as data (no training here).

A ``Train`` stage trains one run (its ``init``: the stage whose model it starts from; ``teacher``: the stage it
distils from); an ``Eval`` stage scores one trained run on the test set. Stage names are global: a stage two
protocols need (the unpruned pre-training, the unpruned VQA and retrieval fine-tunes) is planned once and run once.
A ``Row`` is one line of a table: the chain of training stages that produced its model (its budget is the sum of
their samples) and the evaluation that scores it.

    trips / elip   pt-{none,m}-sS -> {vqa,ret}-{none,m}-{none,m}-sS (the 2x2: pre-train x fine-tune with m)
    tip            vilt-warm-sS (unpruned VQA on the single-stream model, from scratch) -> tip1-sS (stage 1) ->
                   tip2-sS (stage 2); vilt-{none,evit,tome,random}-sS from vilt-warm-sS for stage 1 + 2's steps
    laps           ret-none-{none,trips,evit,tome}-sS, laps-paper-sS, laps-warm-sS -> laps-released-sS
    dynamicvit     vqa-none-none-sS (the warm-up and teacher) -> dvit-{none,dynamicvit,evit}-sS
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .profiles import ProtocolProfile, check_protocols


@dataclass(frozen=True)
class Train:
    name: str
    task: str  # pretrain / vqa / retrieval
    arch: str  # albef / vilt
    steps: int
    lr: float
    batch_size: int
    seed: int
    method: Optional[Mapping[str, Any]] = None  # a ReduceConfig's dict; None = unpruned
    init: Optional[str] = None  # the stage it starts from; None = from scratch
    teacher: Optional[str] = None  # the stage it distils from (learned methods)
    options: Mapping[str, Any] = field(default_factory=dict)  # task options

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size


@dataclass(frozen=True)
class Eval:
    name: str
    run: str  # the Train stage it scores, with the method it was trained with
    kind: str  # vqa / retrieval


@dataclass(frozen=True)
class Row:
    protocol: str
    table: str
    label: str
    seed: int
    chain: Tuple[str, ...]  # Train stages, first to last
    eval: str
    cells: Mapping[str, Any] = field(default_factory=dict)  # what sets the row apart (pre-train / fine-tune method)


@dataclass
class Plan:
    prof: ProtocolProfile
    protocols: Tuple[str, ...]
    trains: Dict[str, Train] = field(default_factory=dict)
    evals: Dict[str, Eval] = field(default_factory=dict)
    rows: List[Row] = field(default_factory=list)

    def add(self, stage) -> str:
        """Plan ``stage`` (once: a stage of the same name must be the same stage)."""
        book = self.trains if isinstance(stage, Train) else self.evals
        old = book.get(stage.name)
        if old is not None and old != stage:
            raise ValueError(f"two different stages named {stage.name!r}: {old} and {stage}")
        book[stage.name] = stage
        return stage.name

    def budget(self, row: Row) -> int:
        """Training samples of a row: every stage of its chain, warm-up included."""
        return sum(self.trains[n].samples for n in row.chain)

    def chain(self, last: str) -> Tuple[str, ...]:
        """The stages that lead to ``last`` through ``init``, first to last."""
        out = [last]
        while self.trains[out[-1]].init is not None:
            out.append(self.trains[out[-1]].init)
        return tuple(reversed(out))

    def row(self, protocol: str, table: str, label: str, seed: int, last: str, kind: str, **cells: Any) -> None:
        ev = self.add(Eval(f"eval-{last}", last, kind))
        self.rows.append(Row(protocol, table, label, seed, self.chain(last), ev, cells))


def keep_per_layer(f: float, layers) -> float:
    """rho with rho ** len(layers) = f: the per-layer keep whose cumulative keep after the last layer is ``f``."""
    return round(f ** (1.0 / len(layers)), 4)


def method_point(prof: ProtocolProfile, method: str, arch: str = "albef") -> Optional[Dict[str, Any]]:
    """The method's config at the shared keep on the profile's model (the demo's operating points)."""
    from ..demo.profiles import point
    from ..config import load_preset, override

    cfg = override(load_preset("small"), **prof.model(arch))
    rc = point(prof.base, method, prof.keep, cfg)
    return None if rc is None else rc.to_dict()


def build_plan(prof: ProtocolProfile, protocols=()) -> Plan:
    plan = Plan(prof, check_protocols(protocols))
    for seed in prof.seeds:
        for p in plan.protocols:
            _PLANNERS[p](plan, seed)
    return plan


def _pretrain(plan: Plan, seed: int, m: str) -> str:
    r = plan.prof.pretrain
    method = None if m == "none" else method_point(plan.prof, m)
    return plan.add(Train(f"pt-{m}-s{seed}", "pretrain", "albef", r.steps, r.lr, r.batch_size, seed, method,
                          options=r.options))


def _finetune(plan: Plan, seed: int, task: str, pt: str, ft: str, **extra: Any) -> str:
    r = plan.prof.vqa if task == "vqa" else plan.prof.retrieval
    method = None if ft == "none" else method_point(plan.prof, ft)
    short = "vqa" if task == "vqa" else "ret"
    return plan.add(Train(f"{short}-{pt}-{ft}-s{seed}", task, "albef", r.steps, r.lr, r.batch_size, seed, method,
                          init=_pretrain(plan, seed, pt), options={**r.options, **extra}))


def _two_by_two(plan: Plan, seed: int, m: str) -> None:
    for task, kind in (("vqa", "vqa"), ("retrieval", "retrieval")):
        for pt in ("none", m):
            for ft in ("none", m):
                last = _finetune(plan, seed, task, pt, ft)
                plan.row(m, task, f"pre-train {pt}, fine-tune {ft}", seed, last, kind, pretrain=pt, finetune=ft)


def _plan_trips(plan: Plan, seed: int) -> None:
    _two_by_two(plan, seed, "trips")


def _plan_elip(plan: Plan, seed: int) -> None:
    _two_by_two(plan, seed, "elip")


def _plan_tip(plan: Plan, seed: int) -> None:
    prof = plan.prof
    w, v = prof.vilt_warmup, prof.vqa
    warm = plan.add(Train(f"vilt-warm-s{seed}", "vqa", "vilt", w.steps, w.lr, w.batch_size, seed, options=w.options))
    tip = {"name": "tip", "layers": list(prof.tip_layers), "keep": keep_per_layer(prof.keep, prof.tip_layers)}
    s1 = plan.add(Train(f"tip1-s{seed}", "vqa", "vilt", prof.tip_stage1, v.lr, v.batch_size, seed, tip, warm, warm,
                        {**v.options, "stage": 1}))
    s2 = plan.add(Train(f"tip2-s{seed}", "vqa", "vilt", prof.tip_stage2, v.lr, v.batch_size, seed, tip, s1, warm,
                        {**v.options, "stage": 2}))
    plan.row("tip", "vqa", "TiP (stage 1 + stage 2, distilled)", seed, s2, "vqa", method="tip")
    steps = prof.tip_stage1 + prof.tip_stage2
    for m in ("none", "evit", "tome", "random"):
        method = None if m == "none" else method_point(prof, m, "vilt")
        last = plan.add(Train(f"vilt-{m}-s{seed}", "vqa", "vilt", steps, v.lr, v.batch_size, seed, method, warm,
                              options=v.options))
        plan.row("tip", "vqa", "unpruned" if m == "none" else m, seed, last, "vqa", method=m)


def _plan_laps(plan: Plan, seed: int) -> None:
    prof = plan.prof
    r = prof.retrieval
    for m in ("none", "trips", "evit", "tome"):
        plan.row("laps", "retrieval", "unpruned" if m == "none" else m, seed, _finetune(plan, seed, "retrieval", "none", m),
                 "retrieval", method=m)
    pt = _pretrain(plan, seed, "none")
    paper = {"name": "laps", "keep": prof.keep, "options": {"official": False}}
    last = plan.add(Train(f"laps-paper-s{seed}", "retrieval", "albef", r.steps, r.lr, r.batch_size, seed, paper, pt,
                          options={**r.options, "hardest": True}))
    plan.row("laps", "retrieval", "LAPS (paper mode)", seed, last, "retrieval", method="laps-paper")
    released = {"name": "laps", "keep": prof.keep, "options": {"official": True}}
    first = pt
    if prof.laps_warm:  # the released code's first epoch: hinge summed over every negative
        first = plan.add(Train(f"laps-warm-s{seed}", "retrieval", "albef", prof.laps_warm, r.lr, r.batch_size, seed,
                               released, pt, options={**r.options, "hardest": False}))
    last = plan.add(Train(f"laps-released-s{seed}", "retrieval", "albef", r.steps - prof.laps_warm, r.lr, r.batch_size,
                          seed, released, first, options={**r.options, "hardest": True}))
    plan.row("laps", "retrieval", "LAPS (released mode)", seed, last, "retrieval", method="laps-released")


def _plan_dynamicvit(plan: Plan, seed: int) -> None:
    prof = plan.prof
    v = prof.vqa
    warm = _finetune(plan, seed, "vqa", "none", "none")
    dvit = {"name": "dynamicvit", "layers": list(prof.dynamicvit_layers),
            "keep": keep_per_layer(prof.keep, prof.dynamicvit_layers)}
    for m in ("none", "dynamicvit", "evit"):
        method = None if m == "none" else dvit if m == "dynamicvit" else method_point(prof, m)
        teacher = warm if m == "dynamicvit" else None
        last = plan.add(Train(f"dvit-{m}-s{seed}", "vqa", "albef", prof.learned_steps, v.lr, v.batch_size, seed, method,
                              warm, teacher, options=v.options))
        plan.row("dynamicvit", "vqa", "unpruned" if m == "none" else m, seed, last, "vqa", method=m)


_PLANNERS = {"trips": _plan_trips, "elip": _plan_elip, "tip": _plan_tip, "laps": _plan_laps,
             "dynamicvit": _plan_dynamicvit}

__all__ = ["Train", "Eval", "Row", "Plan", "build_plan", "keep_per_layer", "method_point"]
