"""Measure the cost of token selection itself: the time spent inside each reducer as a share of the time of the
layer it sits in, on a full model forward (default: the albef-base preset at 384x384, CPU, random weights).

    python scripts/selection_overhead.py --method trips --method evit \
        --method elip --method '{"name": "elip", "options": {"lookahead": false}}' --method random

Each --method is a registered name (its defaults) or a JSON ReduceConfig dict. Timings: forward pre-hooks and
hooks with time.perf_counter around every reducer call and around the layer hosting it; per forward pass the
reducer and layer times are summed per slot, and the median over the timed repeats is reported (after warm-up).
The share is the median over passes of reducer / layer (the layer time includes the reducer). "model ms" is the
median time of the whole model forward, to compare with the unpruned model (method "none", always measured first).
Use --threads 1 on a shared machine: with several threads, small ops wait on descheduled worker threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict

import torch

import vlprune


def parse_method(text: str) -> vlprune.ReduceConfig:
    text = text.strip()
    if text.startswith("{"):
        return vlprune.ReduceConfig.from_dict(json.loads(text))
    return vlprune.ReduceConfig(text)


def label(rc: vlprune.ReduceConfig) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(rc.options.items()))
    return rc.name + (f"[{opts}]" if opts else "")


class SlotTimer:
    """perf_counter around modules; ``totals`` sums the seconds per key within one forward pass."""

    def __init__(self) -> None:
        self.totals = defaultdict(float)
        self._start = {}
        self._handles = []

    def watch(self, key: str, module: torch.nn.Module) -> None:
        def pre(*_):
            self._start[key] = time.perf_counter()

        def post(*_):
            self.totals[key] += time.perf_counter() - self._start.pop(key)

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def measure(model, rc, inputs, warmup: int, repeats: int):
    vlprune.attach(model, rc)
    timer = SlotTimer()
    slots = model.reduction_slots()
    reducers = model.reducers()
    for name, red in reducers.items():
        group, idx = name.rsplit(".", 1)
        timer.watch(f"{name}:reducer", red)
        timer.watch(f"{name}:layer", slots[group][int(idx) - 1])
    per_key, totals, tokens = defaultdict(list), [], {}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            timer.totals.clear()
            t0 = time.perf_counter()
            out = model(*inputs, trace=(i == 0))
            dt = time.perf_counter() - t0
            if i == 0 and out.image.trace:
                tokens = {t.layer: t.tokens for t in out.image.trace}
            if i >= warmup:
                totals.append(dt)
                for k, v in timer.totals.items():
                    per_key[k].append(v)
    timer.remove()
    rows = []
    for name in reducers:
        rs, ls = per_key[f"{name}:reducer"], per_key[f"{name}:layer"]
        r, lay = statistics.median(rs), statistics.median(ls)
        share = statistics.median(a / b for a, b in zip(rs, ls))  # per pass, robust to a slow pass
        group, idx = name.rsplit(".", 1)
        tk = tokens.get(int(idx), "-") if group in ("vision", "joint") else "-"
        rows.append((name, tk, r * 1e3, lay * 1e3, 100.0 * share))
    return rows, statistics.median(totals) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="albef-base")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--method", action="append", default=[], help="a method name or a JSON ReduceConfig (repeat)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    over = {"vision.image_size": args.image_size, "use_momentum": False, "queue_size": 0}
    model = vlprune.build_model(args.model, **over).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    ids = torch.randint(2, cfg.text.vocab_size, (args.batch, args.text_len), generator=g)
    mask = torch.ones_like(ids)
    inputs = (images, ids, mask)
    methods = [vlprune.ReduceConfig("none")] + [parse_method(m) for m in args.method]
    print(f"# {args.model} at {args.image_size}x{args.image_size} ({cfg.vision.num_patches} patches), batch {args.batch}, "
          f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'method':34s} {'slot':10s} {'tokens after':>12s} {'reducer ms':>11s} {'layer ms':>9s} {'share':>7s} {'model ms':>9s}")
    for rc in methods:
        rows, total = measure(model, rc, inputs, args.warmup, args.repeats)
        if not rows:
            print(f"{label(rc):34s} {'-':10s} {'-':>12s} {'-':>11s} {'-':>9s} {'-':>7s} {total:9.1f}")
        for slot, tk, r, lay, share in rows:
            print(f"{label(rc):34s} {slot:10s} {str(tk):>12s} {r:11.2f} {lay:9.1f} {share:6.1f}% {total:9.1f}")


if __name__ == "__main__":
    main()
