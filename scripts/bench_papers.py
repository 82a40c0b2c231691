"""Every method at each seed paper's configuration, in one run, written as one markdown table (issue 27, part 5).

    python scripts/bench_papers.py --device cuda --out bench_papers.md            # the full run (a GPU)
    python scripts/bench_papers.py --smoke --out smoke.md --threads 1             # seconds on a CPU (the test)

Configurations (random weights; speed does not depend on them):

  trips-elip  ALBEF-base at 384 px (TRIPS and ELIP's setting): none, trips, trips placement=pre, elip,
              elip lookahead=False, evit, tome, dynamicvit, random
  tip         ViLT-B/32 at 384 px (TiP's setting): none, tip, trips (TRIPS-S), evit, tome, random
  laps        ALBEF-base at 224 px (LAPS's ViT-B/16 at 224): none, laps

For each configuration, precision (fp32, bf16) and compile setting (eager; with --compile also torch.compile):
inference throughput (pairs/s) and latency at --batch-size, peak memory, the measured speed-up over ``none``,
the FLOPs ideal and their ratio, from ``vlprune.bench.run_bench`` (interleaved, median of --repeats). Methods run
with each paper's default layers and keep rates. ``--smoke``: the tiny models (same method lists), 32 px, batch 2,
one repeat, fp32 and bf16 eager; it checks that the script runs, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

import vlprune
from vlprune import ReduceConfig as RC
from vlprune.bench import BenchSettings, run_bench

def albef_methods(tome_r: int) -> List[RC]:
    return [RC("trips"), RC("trips", options={"placement": "pre"}), RC("elip"),
            RC("elip", options={"lookahead": False}), RC("evit"), RC("tome", options={"r": tome_r}), RC("dynamicvit"), RC("random")]


def vilt_methods(tome_r: int) -> List[RC]:
    return [RC("tip"), RC("trips"), RC("evit"), RC("tome", options={"r": tome_r}), RC("random")]


# name -> (model preset, image size, methods(ToMe's r), what it reproduces); ToMe merges r = 8 tokens per layer
# (r = 2 on the smoke run's 16 patches)
CONFIGS = {
    "trips-elip": ("albef-base", 384, albef_methods, "ALBEF-base at 384 px (TRIPS, ELIP)"),
    "tip": ("vilt-base", 384, vilt_methods, "ViLT-B/32 at 384 px (TiP)"),
    "laps": ("albef-base", 224, lambda r: [RC("laps")], "ViT-B/16 at 224 px (LAPS)"),
}
COLUMNS = ("config", "precision", "compiled", "method", "batch", "pairs/s", "latency ms", "peak MB", "speedup",
           "ideal", "ratio")


def smoke_model(preset: str, tmp: Path) -> str:
    """The tiny model in the architecture of ``preset`` (a config JSON for ViLT)."""
    if vlprune.load_preset(preset).arch != "vilt":
        return "tiny"
    cfg = vlprune.config.override(vlprune.load_preset("tiny"), arch="vilt", use_momentum=False,
                                  **{"text.layers": 0, "fusion_layers": 0})
    path = tmp / "tiny-vilt.json"
    path.write_text(json.dumps(vlprune.config.to_dict(cfg)))
    return str(path)


def rows_to_markdown(rows: List[Dict]) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["config"], r["precision"], "yes" if r.get("compiled") else "no", r["label"],
                 str(r.get("batch_size", "n/a")), f(r.get("throughput"), ".1f"), f(r.get("latency_ms"), ".1f"),
                 f(r.get("peak_mem_mb"), ".0f"), f(r.get("speedup"), ".2f"), f(r.get("ideal_speedup"), ".2f"),
                 f(r.get("speedup_ratio"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU, 8 on CPU (smoke: 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, median (default 10; smoke: 1)")
    p.add_argument("--precision", action="append", choices=("fp32", "bf16"), default=None,
                   help="repeatable (default: fp32 and bf16)")
    p.add_argument("--compile", action="store_true", help="also measure every method under torch.compile")
    p.add_argument("--only", action="append", choices=list(CONFIGS), default=None, help="repeatable")
    p.add_argument("--smoke", action="store_true", help="tiny models: checks the script runs (numbers mean nothing)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="markdown file (default: stdout)")
    p.add_argument("--json-out", default=None, help="also one JSON row per measurement")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (2 if args.smoke else 64 if args.device.startswith("cuda") else 8)
    repeats = args.repeats or (1 if args.smoke else 10)
    precisions = args.precision or ["fp32", "bf16"]
    compiles = [False, True] if args.compile else [False]
    t0 = time.perf_counter()
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(CONFIGS):
            preset, size, methods, _ = CONFIGS[name]
            model = smoke_model(preset, Path(tmp)) if args.smoke else preset
            for prec in precisions:
                for comp in compiles:
                    s = BenchSettings(model=model, image_size=None if args.smoke else size, batch_size=batch,
                                      device=args.device, repeats=repeats, warmup=0 if args.smoke else 2,
                                      precision=prec, compile=comp, text_len=30)
                    print(f"{name} {prec}{' compiled' if comp else ''} ...", file=sys.stderr, flush=True)
                    for r in run_bench(s, methods(2 if args.smoke else 8)):
                        if ":" not in r["method"]:  # the eager / reference side rows run_bench adds
                            rows.append({**r, "config": name})
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "CPU"
    smoke = " (SMOKE: tiny models, numbers mean nothing)" if args.smoke else ""
    head = [f"# Methods at the papers' configurations{smoke}",
            "", f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {device} "
            f"({args.device}), torch {torch.__version__}, batch {batch}, median of {repeats} round(s), "
            f"{time.perf_counter() - t0:.0f} s in all. Command: `python scripts/bench_papers.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
    for name in args.only or list(CONFIGS):
        head.append(f"- `{name}`: {CONFIGS[name][3]}")
    text = "\n".join(head) + "\n\n" + rows_to_markdown(rows) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
