"""The protocols' report: ``report.md`` / ``report.html`` (one section per protocol: its tables at equal budget,
the pre-training speed of TRIPS and ELIP, one loss / validation curve figure per row, and a verdict paragraph
generated from the numbers) and ``results.json`` with every number.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .plan import Plan
from .summary import RECALLS, paired, pretrain_speed, row_groups, shared_prefix, summarize
from .verdicts import VERDICTS

TITLES = {"trips": "TRIPS: reduction in pre-training and fine-tuning (2x2)",
          "elip": "ELIP: reduction in pre-training and fine-tuning (2x2)",
          "tip": "TiP on the single-stream (ViLT-style) model, two stages",
          "laps": "LAPS on retrieval", "dynamicvit": "DynamicViT with its schedule and losses"}


def _fmt_ci(r: Dict[str, Any]) -> str:
    if r.get("low") is None:
        return "n/a (1 seed)" if r.get("metric") == "r_mean" else "n/a"
    return f"{r['low']:.1f}..{r['high']:.1f}"


def _conv(v: Optional[bool]) -> str:
    return "n/a (< 3 points)" if v is None else "plateau" if v else "not converged"


def _diff(d: Optional[Dict[str, Any]]) -> str:
    if d is None:
        return "(reference)"
    iv = "" if d["low"] is None else f" [{d['low']:+.1f}, {d['high']:+.1f}]"
    return f"{d['diff']:+.1f}{iv}" + ("" if d["p"] is None else f" p={d['p']:.3f}")


def protocol_tables(plan: Plan, res: Dict[str, Any], protocol: str) -> Dict[str, List[Dict[str, Any]]]:
    """{table: rows}, each row pooled over seeds, with its difference to the table's first row."""
    out = {}
    for table, groups in row_groups(plan, protocol).items():
        shared = shared_prefix([rs[0].chain for rs in groups.values()])
        rows = [summarize(plan, res, rs, plan.prof.n_boot, shared) for rs in groups.values()]
        for r in rows:
            r["vs_first"] = None if r is rows[0] else paired(r, rows[0], plan.prof.n_boot)
        out[table] = rows
    return out


def _columns(metric: str):
    cols = [("label", "row", ""), ("budget", "training samples", "d"), ("warmup", "of which shared first stages", "d"),
            ("seeds", "seeds", "d"), ("value", "accuracy %" if metric == "accuracy" else "r_mean", ".1f"),
            (_fmt_ci, "95% interval", ""), (lambda r: _diff(r["vs_first"]), "minus first row", ""),
            ("image_tokens", "image tokens", ".1f"), (lambda r: _conv(r["converged"]), "validation", "")]
    if metric == "r_mean":
        cols[6:6] = [(lambda r, k=k: _recall(r, k), k.replace("_", " "), "") for k in RECALLS]
        cols.insert(-1, ("slimmed_tokens", "LAPS: tokens after slimming", ".0f"))
    return cols


def _recall(r: Dict[str, Any], k: str) -> str:
    ci = r.get(k + "_ci")
    return "n/a" if r.get(k) is None else f"{r[k]:.1f}" + (f" ({ci[0]:.0f}-{ci[1]:.0f})" if ci else "")


SPEED_COLUMNS = [("pretrain", "pre-trained with", ""), ("samples_per_s", "samples/s", ".1f"),
                 ("speedup", "speed-up", ".2f"), ("train_seconds", "wall time s", ".0f"),
                 ("saved_mib", "saved for backward MiB", ".1f"), ("cuda_peak_mib", "CUDA peak MiB", ".0f"),
                 (lambda r: _conv(r["converged"]), "validation (zero-shot r_mean)", "")]


def curve_figure(plan: Plan, res: Dict[str, Any], rows, path: Path, title: str) -> Path:
    """Training loss (left) and validation metric (right) of a row over its whole chain of stages (steps counted
    from the first stage), one line per seed; dotted lines mark where a stage ends."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.4))
    FigureCanvasAgg(fig)
    ax_l, ax_v = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, row in enumerate(rows):
        offset, lx, ly, vx, vy = 0, [], [], [], []
        for name in row.chain:
            s = res["train"][name]
            lx += [offset + a for a, _ in s["loss"]]
            ly += [b for _, b in s["loss"]]
            vx += [offset + a for a, _ in s["val"]]
            vy += [b for _, b in s["val"]]
            offset += plan.trains[name].steps
            if i == 0 and name != row.chain[-1]:
                for ax in (ax_l, ax_v):
                    ax.axvline(offset, color="grey", ls=":", lw=1)
        ax_l.plot(lx, ly, color=f"C{i}", lw=1.2, label=f"seed {row.seed}")
        ax_v.plot(vx, vy, color=f"C{i}", marker="o", ms=4, lw=1.2, label=f"seed {row.seed}")
    ax_l.set_xlabel("optimiser step (whole chain)")
    ax_l.set_ylabel("training loss")
    ax_v.set_xlabel("optimiser step (whole chain)")
    ax_v.set_ylabel("validation " + res["train"][rows[0].chain[-1]]["val_metric"])
    for ax in (ax_l, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def build_sections(out: Path, plan: Plan, res: Dict[str, Any]) -> tuple:
    """(sections of the report, the numbers for results.json)."""
    from ..viz.report import Figure, Section, Table

    sections, numbers = [], {}
    for p in plan.protocols:
        tables = protocol_tables(plan, res, p)
        speed = pretrain_speed(res, plan, ("none", p)) if p in ("trips", "elip") else None
        verdict = VERDICTS[p](tables, speed, plan.prof)
        tabs, figs = [], []
        for table, rows in tables.items():
            metric = rows[0]["metric"]
            tabs.append(Table([r for r in rows], _columns(metric), f"{table}: every row trained on the same data "
                              f"with the same training samples (warm-up included) and seeds {list(plan.prof.seeds)}; "
                              f"test set: {_test_size(rows)}"))
            for label, rs in row_groups(plan, p)[table].items():
                path = curve_figure(plan, res, rs, out / "curves" / f"{p}-{table}-{_slug(label)}.png",
                                    f"{p} / {table}: {label}")
                figs.append(Figure(path, f"{p}, {table}, {label}: training loss and validation curve"))
        if speed:
            tabs.insert(0, Table(speed, SPEED_COLUMNS, "pre-training (ITC + ITM + MLM) with and without the method: "
                                 "same data, steps and seeds; samples/s is the median over the log intervals"))
        sections.append(Section(TITLES[p], text=[verdict], tables=tabs, figures=figs))
        numbers[p] = {"tables": {t: [{k: v for k, v in r.items() if k != "scores"} for r in rows]
                                 for t, rows in tables.items()}, "pretrain": speed, "verdict": verdict}
    return sections, numbers


def _test_size(rows) -> str:
    r = rows[0]
    return f"{r['images']} retrieval images" if r["metric"] == "r_mean" else f"{len(r['scores']) // r['seeds']} questions"


def write_report(out: Path, plan: Plan, res: Dict[str, Any], timings: Sequence[Dict[str, Any]], threads: int,
                 wall: float) -> Path:
    from ..viz.report import Section, write_sections

    prof = plan.prof
    sections, numbers = build_sections(out, plan, res)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores".replace("  ", " ")
    trained = sum(t["seconds"] for t in timings if not t.get("cached"))
    head = [f"profile {prof.name}, seeds {list(prof.seeds)}, {now}, {machine}, {threads} torch thread(s)",
            f"wall time of this invocation {wall:.0f} s ({trained:.0f} s in stages run now; finished stages reused: "
            f"{sum(1 for t in timings if t.get('cached'))})",
            f"data: the demo's {prof.base.name} scenes ({prof.scenes.family}, {prof.scenes.images} images, test share "
            f"{prof.scenes.test_fraction}); validation: {prof.val_images} images of another scenes seed",
            f"token budget of every pruned row: keep {prof.keep} of the image tokens"]
    if prof.smoke:
        head.insert(0, "SMOKE RUN (quick profile): a tiny model trained for a few steps; the numbers mean nothing")
    sections = [Section("Run", bullets=head)] + sections
    md, _ = write_sections(out, "vlprune protocols", sections)
    results = {"profile": prof.name, "protocols": list(plan.protocols), "seeds": list(prof.seeds), "date": now,
               "machine": machine, "threads": threads, "wall_seconds": wall, "keep": prof.keep,
               "results": numbers, "stages": list(timings),
               "train": {n: {k: v for k, v in r.items()} for n, r in res["train"].items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return md


__all__ = ["write_report", "build_sections", "protocol_tables", "curve_figure", "TITLES"]
