"""The benchmark: FLOPs, tokens per layer, throughput, latency and memory of one model under several methods.

``run_bench(settings, methods)`` returns one row (a dict) per method; ``format_table`` prints them aligned.
All methods run on the same model (same weights) and the same inputs, one after the other, in one process, and
``none`` is always measured too, so that every speed-up is relative to a baseline measured in the same run.
Inference timings are interleaved: each round times every method once (in a rotating order), and the median over
rounds is taken, so that other load on the machine slows all methods alike instead of whichever ran at the time.
``--train`` runs one method after the other (each keeps its own optimiser state).
The FLOPs-ideal speed-up is ``gflops_total(none) / gflops_total(method)`` (forward, one pair; for ``--train`` the
FLOPs of a whole training step); ``speedup_ratio = speedup / ideal_speedup`` says how much of the ideal the
measured speed-up reaches (below 1: selection overhead and kernels that do not scale with tokens).

Memory: ``static_mem_mb`` is what the weights and buffers hold (in ``--train`` mode also the optimiser state);
``peak_mem_mb`` is the peak growth during one call on top of that (activations and temporaries; in ``--train``
mode also the gradients): the CUDA allocator's peak on GPU, the peak RSS growth on CPU (``bench.memory``). A
memory budget is compared with ``static_mem_mb + peak_mem_mb``.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import load_preset, override
from ..models.build import attach, build_model, load_pretrained
from ..reduce.registry import ReduceConfig, get_spec
from ..reduce.trace import compact_tokens

from .flops import analytic_flops, count_flops, flop_counter_mode, layer_tokens, tokens_after
from .memory import measure_peak, tensor_bytes
from .throughput import find_max_batch, fits_budget, median_time, time_interleaved
from .train_step import PretrainStep

log = logging.getLogger(__name__)
_MIB = 1024.0 * 1024.0


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. ``model``: preset name or config JSON (random weights), or ``checkpoint``: a run dir.
    ``batch_size`` None = 8 on CPU / 32 on GPU unless ``max_batch``; ``mem_budget_gb`` caps the largest-batch
    search (on CPU without it: half of the available memory)."""

    model: str = "tiny"
    checkpoint: Optional[str] = None
    image_size: Optional[int] = None
    text_len: int = 40
    batch_size: Optional[int] = None
    max_batch: bool = False
    device: str = "cpu"
    flops_only: bool = False
    train: bool = False
    mem_budget_gb: Optional[float] = None
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    max_batch_cap: int = 1024

    def __post_init__(self) -> None:
        for name, lo in (("text_len", 1), ("repeats", 1), ("warmup", 0), ("max_batch_cap", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch size must be an integer >= 1, got {self.batch_size!r}")
        if self.batch_size is not None and self.max_batch:
            raise ValueError("give either a batch size or the largest-batch search, not both")
        if self.mem_budget_gb is not None and not (self.mem_budget_gb > 0 and math.isfinite(self.mem_budget_gb)):
            raise ValueError(f"memory budget must be a positive number of GB, got {self.mem_budget_gb!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine")

    @property
    def budget_mb(self) -> Optional[float]:
        return None if self.mem_budget_gb is None else self.mem_budget_gb * 1024.0


def build_bench_model(s: BenchSettings) -> nn.Module:
    """The model to measure, at ``s.image_size`` (position embeddings interpolated when loading a checkpoint).
    Inference runs drop the momentum encoders and queues (never used in a forward pass)."""
    over = {} if s.image_size is None else {"vision.image_size": s.image_size}
    if not s.train:
        over.update(use_momentum=False, queue_size=0)
    if s.checkpoint is not None:
        over = {k: v for k, v in over.items() if k == "vision.image_size"}  # keep the checkpoint's own modules
        model = load_pretrained(s.checkpoint, method=None, **over)
    else:
        model = build_model(override(load_preset(s.model), **over) if over else load_preset(s.model))
    L = model.cfg.text.max_len
    if s.text_len > L:
        raise ValueError(f"text length {s.text_len} exceeds the model's max_len {L}")
    return model.to(s.device)


def make_inputs(cfg, batch: int, text_len: int, device, generator: torch.Generator):
    """Random images (B, C, S, S), random token ids (B, L) in [1, vocab) and an all-ones mask: a caption of
    ``text_len`` real tokens, as text-guided methods need one."""
    v = cfg.vision
    images = torch.randn(batch, v.channels, v.image_size, v.image_size, generator=generator, device=device)
    ids = torch.randint(1, cfg.text.vocab_size, (batch, text_len), generator=generator, device=device)
    return images, ids, torch.ones(batch, text_len, dtype=torch.long, device=device)


def _load() -> Optional[float]:
    """The 1-minute load average after a measurement (other processes competing for the CPU), where available."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _budget_mb(s: BenchSettings, progress: Callable[[str], None]) -> Optional[float]:
    """The memory budget of a largest-batch search: ``--mem-budget``, else on CPU half of the memory the kernel
    reports available (MemAvailable), else None (GPU: the search stops at the first out-of-memory error)."""
    if s.budget_mb is not None or s.device != "cpu":
        return s.budget_mb
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None  # fits_budget then asks for --mem-budget
    progress(f"  no --mem-budget given: using half of the available memory, {kb / 2 / 1024 / 1024:.1f} GB")
    return kb / 2 / 1024


def _gen(s: BenchSettings, offset: int = 0) -> torch.Generator:
    return torch.Generator(device=s.device).manual_seed(s.seed + offset)


def _label(rc: ReduceConfig) -> str:
    parts = []
    if rc.layers is not None:
        parts.append("L" + ",".join(map(str, rc.layers)))
    if rc.keep is not None:
        parts.append("k" + (",".join(map(str, rc.keep)) if isinstance(rc.keep, tuple) else str(rc.keep)))
    parts += [f"{k}={v}" for k, v in rc.options.items()]
    return rc.name + (f"({';'.join(parts)})" if parts else "")


def _flop_fields(model: nn.Module, s: BenchSettings) -> Dict:
    was_training = model.training
    model.eval()
    images, ids, mask = make_inputs(model.cfg, 1, s.text_len, s.device, _gen(s))
    c = count_flops(model, images, ids, mask)
    lt = layer_tokens(model, images, ids, mask)
    model.train(was_training)
    return {
        "gflops_image": None if c.image is None else c.image / 1e9,
        "gflops_total": c.total / 1e9,
        "gflops_select": c.select / 1e9,
        "gflops_analytic": analytic_flops(model.cfg, s.text_len, lt)["total"] / 1e9,
        "tokens_per_layer": tokens_after(lt),
    }


class _Forward:
    """Forward calls of the model at a batch size, on inputs made once per batch size (shared by all methods)."""

    def __init__(self, model: nn.Module, s: BenchSettings):
        self.model, self.s, self.inputs = model, s, {}

    def __call__(self, b: int) -> Callable[[], object]:
        if b not in self.inputs:
            self.inputs[b] = make_inputs(self.model.cfg, b, self.s.text_len, self.s.device, _gen(self.s))
        images, ids, mask = self.inputs[b]

        def call():
            with torch.inference_mode():
                return self.model(images, ids, mask)

        return call


def _inference_batch(model: nn.Module, s: BenchSettings, fwd: _Forward, progress: Callable[[str], None]) -> int:
    """The batch to time: ``s.batch_size``, the largest that fits (``s.max_batch``), or 8 on CPU / 32 on GPU."""
    dev = torch.device(s.device)
    if not s.max_batch:
        return s.batch_size or (32 if dev.type == "cuda" else 8)
    static_mb = tensor_bytes(model) / _MIB

    def used(b: int) -> Optional[float]:
        _, peak = measure_peak(fwd(b), dev)
        fwd.inputs.pop(b, None)
        return None if peak is None else static_mb + peak

    progress("  searching the largest batch that fits")
    return find_max_batch(fits_budget(used, _budget_mb(s, progress), dev), cap=s.max_batch_cap)


def _time_inference(model: nn.Module, s: BenchSettings, methods: Sequence[ReduceConfig], rows: List[Dict],
                    fwd: _Forward, progress: Callable[[str], None]) -> None:
    """Throughput, latency and memory of every method, timed interleaved (round-robin) so that a busy machine
    slows every method alike; fills the rows in place."""
    dev = torch.device(s.device)
    model.eval()
    setups = [lambda rc=rc: attach(model, rc) for rc in methods]
    n = len(methods)
    progress(f"timing {n} method(s) interleaved: {s.warmup} warm-up + {s.repeats} rounds at each method's batch")
    thr = time_interleaved([(st, fwd(r["batch_size"])) for st, r in zip(setups, rows)], dev, s.warmup, s.repeats)
    load_thr = _load()
    progress(f"timing latency at batch 1: {s.warmup} warm-up + {s.repeats} rounds")
    lat = time_interleaved([(st, fwd(1)) for st in setups], dev, s.warmup, s.repeats)
    for st, rc, r, t_b, t_1 in zip(setups, methods, rows, thr, lat):
        st()
        _, peak = measure_peak(fwd(r["batch_size"]), dev)
        tb = statistics.median(t_b)
        r.update({"throughput": r["batch_size"] / tb, "latency_ms": statistics.median(t_1) * 1000.0,
                  "peak_mem_mb": peak, "static_mem_mb": tensor_bytes(model) / _MIB, "load_avg_1m": load_thr,
                  "times_s": [round(t, 6) for t in t_b]})


def _train_fields(model: nn.Module, s: BenchSettings, progress: Callable[[str], None]) -> Dict:
    dev = torch.device(s.device)
    step = PretrainStep(model, generator=_gen(s, 1))

    def step_at(b: int):
        images, ids, mask = make_inputs(model.cfg, b, s.text_len, s.device, _gen(s))
        return lambda: step(images, ids, mask)

    step_at(2)()  # creates the optimiser state, so that it counts as static memory from here on
    with flop_counter_mode() as fc:
        step_at(2)()
    gflops_step = fc.get_total_flops() / 2 / 1e9

    def static_mb() -> float:
        return tensor_bytes(model, step.optimizer) / _MIB

    def used(b: int) -> Optional[float]:
        _, peak = measure_peak(step_at(b), dev)
        return None if peak is None else static_mb() + peak

    max_fit = None
    if s.mem_budget_gb is not None or s.max_batch:
        progress("  searching the largest batch that fits" + (f" in {s.mem_budget_gb} GB" if s.mem_budget_gb else ""))
        max_fit = find_max_batch(fits_budget(used, _budget_mb(s, progress), dev), start=2, cap=s.max_batch_cap)
    batch = s.batch_size or max_fit or (32 if dev.type == "cuda" else 8)
    call = step_at(batch)
    progress(f"  timing training steps at batch {batch} ({s.warmup} warm-up + {s.repeats} runs)")
    t = median_time(call, dev, s.warmup, s.repeats)
    _, peak = measure_peak(call, dev)
    out = {"mode": "train", "batch_size": batch, "throughput": batch / t, "step_ms": t * 1000.0, "latency_ms": None,
           "peak_mem_mb": peak, "static_mem_mb": static_mb(), "gflops_step": gflops_step, "max_batch": max_fit,
           "load_avg_1m": _load()}
    del step
    model.eval()
    return out


def _with_baseline(methods: Sequence[ReduceConfig]) -> List[ReduceConfig]:
    names = [m.name for m in methods]
    return list(methods) if "none" in names else [ReduceConfig("none")] + list(methods)


def run_bench(
    s: BenchSettings, methods: Sequence[ReduceConfig], progress: Optional[Callable[[str], None]] = None
) -> List[Dict]:
    """One row per method (``none`` added first when missing). Method configs are checked on the model before
    anything is timed, so a bad name or layer fails fast."""
    progress = progress or (lambda msg: log.info(msg))
    for rc in methods:
        get_spec(rc.name)  # unknown names raise, listing the valid ones
    methods = _with_baseline(methods)
    progress(f"building {s.checkpoint or s.model}" + (f" at {s.image_size}px" if s.image_size else ""))
    model = build_bench_model(s)
    for rc in methods:  # validates layers / keep / options against this model ("none" too); attach records the
        attach(model, rc)  # config, so that clear_reducers also undoes what a method set outside the slots (lowres)
        model.clear_reducers()
    rows = []
    fwd = _Forward(model, s)
    for i, rc in enumerate(methods):
        progress(f"[{i + 1}/{len(methods)}] {_label(rc)}")
        attach(model, rc)
        torch.manual_seed(s.seed)
        row = {"method": rc.name, "label": _label(rc), "config": rc.to_dict(), "mode": "train" if s.train else "inference",
               "device": str(s.device), "image_size": model.cfg.vision.image_size, "text_len": s.text_len}
        row.update(_flop_fields(model, s))
        if s.flops_only:
            row.update({"throughput": None, "latency_ms": None, "peak_mem_mb": None})
        elif s.train:
            row.update(_train_fields(model, s, progress))
        else:
            row["batch_size"] = _inference_batch(model, s, fwd, progress)
        rows.append(row)
    if not s.flops_only and not s.train:
        _time_inference(model, s, methods, rows, fwd, progress)
    model.clear_reducers()
    add_speedups(rows)
    return rows


def add_speedups(rows: List[Dict]) -> None:
    """speedup (measured, over the ``none`` row), ideal_speedup (FLOPs), speedup_ratio = speedup / ideal."""
    base = next((r for r in rows if r["method"] == "none"), None)
    for r in rows:
        key = "gflops_step" if r.get("gflops_step") is not None else "gflops_total"
        r["ideal_speedup"] = None if base is None else base[key] / r[key]
        thr, bthr = r.get("throughput"), None if base is None else base.get("throughput")
        r["speedup"] = thr / bthr if thr and bthr else None
        r["speedup_ratio"] = r["speedup"] / r["ideal_speedup"] if r["speedup"] and r["ideal_speedup"] else None


def _f(v, fmt: str) -> str:
    if v is not None and fmt == ".4g" and abs(v) >= 10:
        fmt = ".1f"
    return "n/a" if v is None else format(v, fmt)


def format_table(rows: Sequence[Dict]) -> str:
    """An aligned text table of benchmark rows (inference or train; FLOPs columns only when nothing was timed)."""
    train = any(r.get("mode") == "train" for r in rows)
    timed = any(r.get("throughput") is not None for r in rows)
    cols = [("method", lambda r: r["label"], "<"), ("GFLOPs img", lambda r: _f(r["gflops_image"], ".4g"), ">"),
            ("GFLOPs total", lambda r: _f(r["gflops_total"], ".4g"), ">"),
            ("select", lambda r: _f(r["gflops_select"], ".3g"), ">"), ("tokens", lambda r: compact_tokens(r["tokens_per_layer"]), "<")]
    if train:
        cols += [("GFLOPs step", lambda r: _f(r.get("gflops_step"), ".4g"), ">")]
    if timed and train:
        cols += [("batch", lambda r: str(r.get("batch_size", "n/a")), ">"),
                 ("step ms", lambda r: _f(r.get("step_ms"), ".1f"), ">"),
                 ("max batch", lambda r: str(r.get("max_batch") or "n/a"), ">")]
    elif timed:
        cols += [("batch", lambda r: str(r.get("batch_size", "n/a")), ">"),
                 ("latency ms", lambda r: _f(r["latency_ms"], ".1f"), ">")]
    if timed:
        cols += [("pairs/s", lambda r: _f(r["throughput"], ".2f"), ">"),
                 ("static MB", lambda r: _f(r.get("static_mem_mb"), ".0f"), ">"),
                 ("peak MB", lambda r: _f(r["peak_mem_mb"], ".0f"), ">"),
                 ("speedup", lambda r: _f(r["speedup"], ".2f"), ">")]
    cols += [("ideal", lambda r: _f(r["ideal_speedup"], ".2f"), ">")]
    if timed:
        cols += [("ratio", lambda r: _f(r["speedup_ratio"], ".2f"), ">")]
    cells = [[c[0] for c in cols]] + [[fn(r) for _, fn, _ in cols] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cols))]
    lines = ["  ".join(format(c, f"{a}{w}") for c, w, (_, _, a) in zip(row, widths, cols)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["BenchSettings", "run_bench", "format_table", "add_speedups", "build_bench_model", "make_inputs"]
