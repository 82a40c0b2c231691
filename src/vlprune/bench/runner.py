"""The benchmark: FLOPs, tokens per layer, throughput, latency and memory of one model under several methods.

``run_bench(settings, methods)`` returns one row (a dict) per method; ``format_table`` prints them aligned.
All methods run on the same model (same weights) and the same inputs, one after the other, in one process, and
``none`` is always measured too, so that every speed-up is relative to a baseline measured in the same run.
Inference timings are interleaved: each round times every method once (in a rotating order), and the median over
rounds is taken, so that other load on the machine slows all methods alike instead of whichever ran at the time.
``--train`` times training steps (``--train-task pretrain`` or ``vqa``) interleaved the same way, all methods
sharing one optimiser state.
Each timed call also records the process's CPU time (``cpu_times_s``; ``speedup_cpu`` and ``ratio_cpu`` from its
median): on a shared machine that is the work done without the time spent waiting for a core, the steadier figure
with one thread (with several, it includes threads spinning at barriers).
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import check_pos_int, load_preset, override
from ..models.build import attach, build_model, load_pretrained
from ..reduce.registry import ReduceConfig, get_spec
from ..reduce.trace import compact_tokens

from .flops import analytic_flops, count_flops, flop_counter_mode, layer_tokens, tokens_after
from .memory import measure_peak, tensor_bytes
from .throughput import calls_bar, find_max_batch, fits_budget, median_time, time_call, time_interleaved
from .train_step import TRAIN_TASKS, make_step
from ..runtime import check_precision, maybe_compile, precision_context, thread_info

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
    precision: str = "fp32"
    compile: bool = False
    train_task: str = "pretrain"
    reference: bool = False

    def __post_init__(self) -> None:
        for name, lo in (("text_len", 1), ("repeats", 1), ("warmup", 0), ("max_batch_cap", 1)):
            check_pos_int(name, getattr(self, name), lo)
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
        check_precision(self.precision, self.device)
        if self.train_task not in TRAIN_TASKS:
            raise ValueError(f"--train-task must be one of {', '.join(TRAIN_TASKS)}, got {self.train_task!r}")

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
            with torch.inference_mode(), precision_context(self.s.precision, self.s.device):
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
                    fwd: _Forward, progress: Callable[[str], None], extra: Sequence = ()) -> None:
    """Throughput, latency and memory of every method, timed interleaved (round-robin) so that a busy machine
    slows every method alike; fills the rows in place. ``extra``: more (row, setup, call_at(batch)) workloads
    timed in the same rounds (the plain-PyTorch reference)."""
    dev = torch.device(s.device)
    model.eval()
    setups = [lambda rc=rc: attach(model, rc) for rc in methods] + [e[1] for e in extra]
    calls = [fwd] * len(methods) + [e[2] for e in extra]
    rows = list(rows) + [e[0] for e in extra]
    n = len(rows)
    first: List[Optional[float]] = [None] * n
    if s.compile:  # the first call of each method compiles its layers' shapes: timed alone, before the rounds
        progress("compiling: one first call per method (torch.compile)")
        for i, (st, r, call) in enumerate(zip(setups, rows, calls)):
            if not r.get("compiled"):
                continue  # eager and reference rows
            st()
            first[i] = time_call(call(r["batch_size"]), dev, warmup=0, repeats=1)[0]
            time_call(call(1), dev, warmup=0, repeats=1)  # batch 1 compiles too (latency)
    progress(f"timing {n} method(s) interleaved: {s.warmup} warm-up + {s.repeats} rounds at each method's batch")
    cpu: List[List[float]] = []
    with calls_bar(progress, (s.warmup + s.repeats) * n, "throughput") as tick:
        thr = time_interleaved([(st, call(r["batch_size"])) for st, r, call in zip(setups, rows, calls)], dev,
                               s.warmup, s.repeats, cpu, tick)
    load_thr = _load()
    progress(f"timing latency at batch 1: {s.warmup} warm-up + {s.repeats} rounds")
    with calls_bar(progress, (s.warmup + s.repeats) * len(calls), "latency") as tick:
        lat = time_interleaved([(st, call(1)) for st, call in zip(setups, calls)], dev, s.warmup, s.repeats, tick=tick)
    for st, call, r, t_b, t_1, t_first, c_b in zip(setups, calls, rows, thr, lat, first, cpu):
        st()
        _, peak = measure_peak(call(r["batch_size"]), dev)
        tb = statistics.median(t_b)
        r["compile_s"] = None if t_first is None else max(0.0, t_first - tb)
        r.update({"throughput": r["batch_size"] / tb, "latency_ms": statistics.median(t_1) * 1000.0,
                  "peak_mem_mb": peak, "static_mem_mb": tensor_bytes(model) / _MIB, "load_avg_1m": load_thr,
                  "times_s": [round(t, 6) for t in t_b], "cpu_times_s": [round(t, 6) for t in c_b],
                  "cpu_throughput": r["batch_size"] / statistics.median(c_b)})


def _time_train(model: nn.Module, s: BenchSettings, methods: Sequence[ReduceConfig], rows: List[Dict],
                progress: Callable[[str], None], extra: Sequence = ()) -> None:
    """Training steps of ``s.train_task`` for every method: FLOPs of a whole step (batch 2, per pair), then step
    time interleaved over the methods (one AdamW state shared by all: the weights change between steps, which does
    not change the time), then each method's peak memory. Fills the rows in place."""
    dev = torch.device(s.device)
    step = make_step(s.train_task, model, generator=_gen(s, 1), precision=s.precision)
    inputs: Dict[int, tuple] = {}

    def step_at(b: int):
        if b not in inputs:
            inputs[b] = make_inputs(model.cfg, b, s.text_len, s.device, _gen(s))
        images, ids, mask = inputs[b]
        return lambda: step(images, ids, mask)

    def static_mb() -> float:
        return tensor_bytes(model, step.optimizer) / _MIB

    step_at(2)()  # creates the optimiser state, so that it counts as static memory from here on
    setups = [lambda rc=rc: attach(model, rc) for rc in methods]
    for st, r in zip(setups, rows):
        st()
        with flop_counter_mode() as fc:
            step_at(2)()
        r["gflops_step"] = fc.get_total_flops() / 2 / 1e9
        max_fit = None
        if s.mem_budget_gb is not None or s.max_batch:
            def used(b: int) -> Optional[float]:
                _, peak = measure_peak(step_at(b), dev)
                inputs.pop(b, None)
                return None if peak is None else static_mb() + peak

            progress(f"  {r['label']}: searching the largest batch that fits"
                     + (f" in {s.mem_budget_gb} GB" if s.mem_budget_gb else ""))
            max_fit = find_max_batch(fits_budget(used, _budget_mb(s, progress), dev), start=2, cap=s.max_batch_cap)
        r.update(max_batch=max_fit, batch_size=s.batch_size or max_fit or (32 if dev.type == "cuda" else 8))
    compiled = _compile(model, s, progress)
    for r, _, _ in extra:
        r["batch_size"] = rows[0]["batch_size"]
    setups += [e[1] for e in extra]
    calls = [step_at] * len(rows) + [e[2] for e in extra]
    rows = list(rows) + [e[0] for e in extra]
    first: List[Optional[float]] = [None] * len(rows)
    if compiled:
        progress("compiling: one first training step per method (torch.compile)")
        for i, (st, r, call) in enumerate(zip(setups, rows, calls)):
            st()
            first[i] = time_call(call(r["batch_size"]), dev, warmup=0, repeats=1)[0]
    progress(f"timing {len(rows)} workload(s)' {s.train_task} steps interleaved: {s.warmup} warm-up + {s.repeats} rounds")
    cpu: List[List[float]] = []
    with calls_bar(progress, (s.warmup + s.repeats) * len(rows), f"{s.train_task} steps") as tick:
        times = time_interleaved([(st, call(r["batch_size"])) for st, r, call in zip(setups, rows, calls)], dev,
                                 s.warmup, s.repeats, cpu, tick)
    load = _load()
    for st, call, r, t_s, t_first, c_s in zip(setups, calls, rows, times, first, cpu):
        st()
        _, peak = measure_peak(call(r["batch_size"]), dev)
        t = statistics.median(t_s)
        r.update({"throughput": r["batch_size"] / t, "step_ms": t * 1000.0, "latency_ms": None, "peak_mem_mb": peak,
                  "static_mem_mb": static_mb(), "load_avg_1m": load, "times_s": [round(x, 6) for x in t_s],
                  "cpu_times_s": [round(x, 6) for x in c_s], "cpu_throughput": r["batch_size"] / statistics.median(c_s),
                  "compiled": compiled, "compile_s": None if t_first is None else max(0.0, t_first - t)})
    del step
    model.eval()


def _compile(model: nn.Module, s: BenchSettings, progress: Callable[[str], None]) -> bool:
    if not s.compile:
        return False
    ok = maybe_compile(model, True, s.device)
    if not ok:
        progress("  --compile: cannot compile here (see the warning); timing eagerly")
    return ok


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
        row = {"method": rc.name, "label": _label(rc), "config": rc.to_dict(),
               "mode": "train" if s.train else "inference", "train_task": s.train_task if s.train else None,
               "device": str(s.device),
               "image_size": model.cfg.vision.image_size, "text_len": s.text_len, "precision": s.precision,
               "compiled": False, "torch": torch.__version__, **thread_info()}
        row.update(_flop_fields(model, s))
        if s.flops_only:
            row.update({"throughput": None, "latency_ms": None, "peak_mem_mb": None})
        elif not s.train:
            row["batch_size"] = _inference_batch(model, s, fwd, progress)
        rows.append(row)
    extra = _reference_workloads(model, s, rows[0], fwd) if (s.reference and not s.flops_only) else []
    if s.train and not s.flops_only:
        _time_train(model, s, methods, rows, progress, extra)
    if not s.flops_only and not s.train:
        if _compile(model, s, progress):  # after the FLOPs counts, which run the model eagerly
            for r in rows:
                r["compiled"] = True
            extra = _eager_workloads(model, methods, rows, fwd) + list(extra)
        _time_inference(model, s, methods, rows, fwd, progress, extra)
    model.clear_reducers()
    rows += [e[0] for e in extra]
    add_speedups(rows)
    _slot_overhead(rows)
    _compile_speedups(rows)
    return rows


def _eager_workloads(model: nn.Module, methods: Sequence[ReduceConfig], rows: List[Dict], fwd: _Forward) -> List[tuple]:
    """With ``--compile``: each method once more, run eagerly (``torch.compiler.set_stance("force_eager")``) in the
    same interleaved rounds, as rows "LABEL:eager", so that the compiled rows' ``compile_speedup`` compares like
    with like."""
    out = []
    for rc, r in zip(methods, rows):
        def at(b: int, call_at=fwd):
            call = call_at(b)

            def eager():
                with torch.compiler.set_stance("force_eager"):
                    return call()
            return eager

        row = {**r, "method": rc.name + ":eager", "label": r["label"] + ":eager", "compiled": False}
        out.append((row, lambda rc=rc: attach(model, rc), at))
    return out


def _compile_speedups(rows: List[Dict]) -> None:
    """``compile_speedup`` on compiled rows: their throughput over the same method's ":eager" row (and from CPU
    time, ``compile_speedup_cpu``)."""
    by = {r["label"]: r for r in rows}
    for r in rows:
        e = by.get(r["label"] + ":eager")
        if e is None or not r.get("throughput") or not e.get("throughput"):
            continue
        r["compile_speedup"] = r["throughput"] / e["throughput"]
        if r.get("cpu_throughput") and e.get("cpu_throughput"):
            r["compile_speedup_cpu"] = r["cpu_throughput"] / e["cpu_throughput"]


def _reference_workloads(model: nn.Module, s: BenchSettings, none_row: Dict, fwd: _Forward) -> List[tuple]:
    """The plain-PyTorch reference (``bench.reference``) as extra (row, setup, call_at(batch)) workloads: inference,
    one row "plain-pytorch" (its forward); ``--train``, two rows "none:itm" and "plain-pytorch:itm" (forward, ITM
    loss and backward, on vlprune's model without a method and on the plain one)."""
    from .reference import PlainALBEF, itm_loss

    model.clear_reducers()
    plain = PlainALBEF(model)
    clear = model.clear_reducers
    base = {k: v for k, v in none_row.items() if k not in ("method", "label", "config")}

    def row(label: str) -> Dict:
        return {**base, "method": label, "label": label, "config": None, "reference": True}

    def inputs(b: int):
        if b not in fwd.inputs:
            fwd.inputs[b] = make_inputs(model.cfg, b, s.text_len, s.device, _gen(s))
        return fwd.inputs[b]

    if not s.train:
        plain.eval()

        def plain_at(b: int):
            images, ids, mask = inputs(b)

            def call():
                with torch.inference_mode(), precision_context(s.precision, s.device):
                    return plain(images, ids, mask)
            return call

        return [(row("plain-pytorch"), clear, plain_at)]

    def itm_at(net: Callable, train_mode: Callable[[], None]):
        def at(b: int):
            images, ids, mask = inputs(b)

            def call():
                train_mode()
                with precision_context(s.precision, s.device):
                    loss = itm_loss(net(images, ids, mask))
                loss.backward()
                return float(loss.detach())
            return call
        return at

    ours = itm_at(lambda i, t, m: model(i, t, m).itm_logits, lambda: model.train())
    theirs = itm_at(plain, lambda: plain.train())
    r1, r2 = row("none:itm"), row("plain-pytorch:itm")
    for r in (r1, r2):
        r["gflops_step"] = None
    return [(r1, clear, ours), (r2, clear, theirs)]


def _slot_overhead(rows: List[Dict]) -> None:
    """``slot_overhead`` on the reference rows: time of vlprune's model without a method over the plain model's,
    minus 1 (inference: the ``none`` row; training: the ``none:itm`` row); also from CPU time."""
    by = {r["label"]: r for r in rows}
    for ours, plain in (("none", "plain-pytorch"), ("none:itm", "plain-pytorch:itm")):
        a, b = by.get(ours), by.get(plain)
        if a is None or b is None or not a.get("throughput") or not b.get("throughput"):
            continue
        b["slot_overhead"] = b["throughput"] / a["throughput"] - 1.0
        if a.get("cpu_throughput") and b.get("cpu_throughput"):
            b["slot_overhead_cpu"] = b["cpu_throughput"] / a["cpu_throughput"] - 1.0


def profile_bench(s: BenchSettings, methods: Sequence[ReduceConfig], progress: Optional[Callable[[str], None]] = None,
                  rounds: int = 1, top: int = 15) -> Tuple[List[Dict], str]:
    """Per-op profiles (``bench.profile``) of one inference forward per method at the bench batch size, interleaved
    over ``rounds``. Returns the FLOPs rows (with ``ideal_speedup``) and the report text: per method the category
    table with the excess over the FLOPs-ideal time, and the top ops."""
    from .profile import category_table, profile_calls, top_ops_table

    progress = progress or (lambda msg: log.info(msg))
    for rc in methods:
        get_spec(rc.name)
    methods = _with_baseline(methods)
    progress(f"building {s.checkpoint or s.model}" + (f" at {s.image_size}px" if s.image_size else ""))
    model = build_bench_model(s)
    rows = []
    for rc in methods:
        attach(model, rc)
        rows.append({"method": rc.name, "label": _label(rc), **_flop_fields(model, s)})
    model.clear_reducers()
    add_speedups(rows)
    model.eval()
    batch = s.batch_size or (32 if torch.device(s.device).type == "cuda" else 8)
    fwd = _Forward(model, s)(batch)
    progress(f"profiling {len(methods)} method(s) at batch {batch}: {s.warmup} warm-up + {rounds} profiled round(s)")
    profs = profile_calls([(r["label"], (lambda rc=rc: attach(model, rc)), fwd) for rc, r in zip(methods, rows)],
                          rounds=rounds, warmup=s.warmup)
    model.clear_reducers()
    ideals = [r["ideal_speedup"] for r in rows]
    head = [f"profile: {s.checkpoint or s.model}, image {model.cfg.vision.image_size}px, text {s.text_len}, batch {batch}, "
            f"{torch.get_num_threads()} thread(s), load {_load()}, torch {torch.__version__}",
            "FLOPs-ideal speed-up: " + ", ".join(f"{r['label']} {r['ideal_speedup']:.2f}" for r in rows),
            "profiled speed-up:    " + ", ".join(f"{p.label} {profs[0].total_ms / p.total_ms:.2f}" for p in profs),
            "", "ms per forward by category (share of the method's time) and excess over t(none)/ideal:",
            category_table(profs, ideals), "", f"top {top} ops: self ms per forward (calls per forward):",
            top_ops_table(profs, top)]
    for r, p in zip(rows, profs):
        r.update({"profile_ms": p.total_ms, "profile_ops": p.ops, "profile_calls": p.calls,
                  "profile_categories": p.by_category()})
    return rows, "\n".join(head)


def add_speedups(rows: List[Dict]) -> None:
    """speedup (measured, over the ``none`` row), ideal_speedup (FLOPs), speedup_ratio = speedup / ideal."""
    none = next((r for r in rows if r["method"] == "none"), None)
    itm = next((r for r in rows if r["method"] == "none:itm"), None)
    eager = next((r for r in rows if r["method"] == "none:eager"), None)
    for r in rows:
        base = itm if r["method"].endswith(":itm") else eager if r["method"].endswith(":eager") else none
        key = "gflops_step" if r.get("gflops_step") is not None else "gflops_total"
        r["ideal_speedup"] = None if base is None else base[key] / r[key]
        thr, bthr = r.get("throughput"), None if base is None else base.get("throughput")
        r["speedup"] = thr / bthr if thr and bthr else None
        r["speedup_ratio"] = r["speedup"] / r["ideal_speedup"] if r["speedup"] and r["ideal_speedup"] else None
        cthr, bcthr = r.get("cpu_throughput"), None if base is None else base.get("cpu_throughput")
        r["speedup_cpu"] = cthr / bcthr if cthr and bcthr else None
        r["ratio_cpu"] = r["speedup_cpu"] / r["ideal_speedup"] if r["speedup_cpu"] and r["ideal_speedup"] else None


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
        cols += [("thr", lambda r: str(r.get("threads", "n/a")), ">")]
        if any(r.get("precision", "fp32") != "fp32" for r in rows):
            cols += [("prec", lambda r: r.get("precision", "fp32"), ">")]
        if any(r.get("compiled") for r in rows):
            cols += [("compile s", lambda r: _f(r.get("compile_s"), ".1f"), ">"),
                     ("vs eager", lambda r: "" if r.get("compile_speedup") is None else
                      f"{r['compile_speedup']:.2f} (cpu {r.get('compile_speedup_cpu', float('nan')):.2f})", ">")]
        cols += [("pairs/s", lambda r: _f(r["throughput"], ".2f"), ">"),
                 ("static MB", lambda r: _f(r.get("static_mem_mb"), ".0f"), ">"),
                 ("peak MB", lambda r: _f(r["peak_mem_mb"], ".0f"), ">"),
                 ("speedup", lambda r: _f(r["speedup"], ".2f"), ">")]
    cols += [("ideal", lambda r: _f(r["ideal_speedup"], ".2f"), ">")]
    if timed:
        cols += [("ratio", lambda r: _f(r["speedup_ratio"], ".2f"), ">")]
    if any(r.get("slot_overhead") is not None for r in rows):
        cols += [("slot overhead", lambda r: "" if r.get("slot_overhead") is None else
                  f"{100 * r['slot_overhead']:+.1f}% (cpu {100 * r.get('slot_overhead_cpu', float('nan')):+.1f}%)", ">")]
    if any(r.get("speedup_cpu") for r in rows):
        cols += [("cpu speedup", lambda r: _f(r.get("speedup_cpu"), ".2f"), ">"),
                 ("cpu ratio", lambda r: _f(r.get("ratio_cpu"), ".2f"), ">")]
    cells = [[c[0] for c in cols]] + [[fn(r) for _, fn, _ in cols] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cols))]
    lines = ["  ".join(format(c, f"{a}{w}") for c, w, (_, _, a) in zip(row, widths, cols)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["BenchSettings", "run_bench", "profile_bench", "format_table", "add_speedups", "build_bench_model", "make_inputs"]
