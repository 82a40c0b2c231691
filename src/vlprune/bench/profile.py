"""Where the time goes: ``torch.profiler`` per-op tables of one forward per method (``vlprune bench --profile``).

Each method runs on the same model and inputs as ``vlprune bench``: one untimed warm-up forward, then ``rounds``
profiled forwards (interleaved over the methods, as the timing is). For each method the profiler's self time per
op (``aten::addmm``, ``aten::_scaled_dot_product_flash_attention_for_cpu``, ...) is summed, and the ops are
grouped into categories (matmul, attention, norm, activation, elementwise, data movement, selection, other).

What the tables say: the FLOPs-ideal time of a method is ``t(none) / ideal`` (``ideal`` the FLOPs-ideal
speed-up). The **excess** of a category is its time in the method minus its time in ``none`` divided by the ideal:
the milliseconds it costs beyond what a perfect FLOPs-proportional speed-up would leave. A positive excess in
"data movement" is gathers, concatenations and copies; in "attention" a kernel that does not speed up with the
tokens; and so on. Shares (per cent of the method's profiled time) are meaningful even on a loaded machine; the
absolute milliseconds are not.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple


# op name (without the "aten::" prefix) -> category. Anything else is "other".
CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "matmul": ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "mkldnn_convolution", "convolution",
               "_convolution", "conv2d", "_addmm_activation"),
    "attention": ("_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention",
                  "_scaled_dot_product_attention_math", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention", "_softmax", "softmax"),
    "norm": ("native_layer_norm", "layer_norm", "normalize", "linalg_vector_norm", "clamp_min"),
    "activation": ("gelu", "sigmoid", "relu", "tanh"),
    "elementwise": ("add", "add_", "mul", "mul_", "div", "div_", "sub", "rsub", "log", "exp", "mean", "sum",
                    "masked_fill", "masked_fill_", "where", "neg", "any", "amax", "pow", "sqrt"),
    "data movement": ("gather", "scatter", "scatter_reduce", "scatter_add_", "index", "index_select", "cat", "copy_",
                      "clone", "contiguous", "to", "_to_copy", "empty_like", "fill_", "zero_", "zeros", "ones",
                      "full", "expand", "stack", "slice", "select", "unsqueeze", "view", "reshape", "permute",
                      "transpose", "t", "_unsafe_view", "as_strided", "unbind", "split", "chunk", "flatten",
                      "squeeze", "_reshape_alias", "detach", "alias", "empty", "empty_strided", "resize_", "narrow",
                      "lift_fresh", "new_ones", "new_zeros", "arange", "eye", "item", "_local_scalar_dense"),
    "selection": ("sort", "topk", "argmax", "argsort", "max", "min"),
}
_CATEGORY_OF = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
CATEGORY_ORDER = tuple(CATEGORIES) + ("other",)


def category(op: str) -> str:
    """The category of a profiler op name (``aten::addmm`` -> "matmul"); unknown ops are "other"."""
    return _CATEGORY_OF.get(op.split("::")[-1], "other")


@dataclass
class OpProfile:
    """One method's profile: self CPU time (ms per forward) and calls per forward of each op."""

    label: str
    ops: Dict[str, float]
    calls: Dict[str, float]

    @property
    def total_ms(self) -> float:
        return sum(self.ops.values())

    def by_category(self) -> Dict[str, float]:
        out: Dict[str, float] = defaultdict(float)
        for op, ms in self.ops.items():
            out[category(op)] += ms
        return {c: out.get(c, 0.0) for c in CATEGORY_ORDER}


def _self_ms(prof) -> Tuple[Dict[str, float], Dict[str, int]]:
    ms: Dict[str, float] = defaultdict(float)
    calls: Dict[str, int] = defaultdict(int)
    for e in prof.key_averages():
        if e.device_type.name != "CPU" and str(e.device_type) != "DeviceType.CPU":
            continue
        t = getattr(e, "self_cpu_time_total", 0.0)
        if t <= 0:
            continue
        ms[e.key] += t / 1000.0
        calls[e.key] += e.count
    return ms, calls


def profile_calls(calls: Sequence[Tuple[str, Callable[[], object], Callable[[], object]]], rounds: int = 1,
                  warmup: int = 1) -> List[OpProfile]:
    """Profile ``(label, setup, fn)`` workloads: ``warmup`` untimed calls each, then ``rounds`` rounds in which
    every workload runs once under the profiler (its ``setup()`` first, not profiled), rotating the order.
    Returns one OpProfile per workload with self times per call (ms) and calls per call."""
    from torch.profiler import ProfilerActivity, profile

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"profile rounds must be an integer >= 1, got {rounds!r}")
    n = len(calls)
    for _, setup, fn in calls:
        setup()
        for _ in range(warmup):
            fn()
    acc_ms: List[Dict[str, float]] = [defaultdict(float) for _ in range(n)]
    acc_calls: List[Dict[str, float]] = [defaultdict(float) for _ in range(n)]
    for r in range(rounds):
        for i in [(r + j) % n for j in range(n)]:
            _, setup, fn = calls[i]
            setup()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            ms, cnt = _self_ms(prof)
            for k, v in ms.items():
                acc_ms[i][k] += v / rounds
            for k, v in cnt.items():
                acc_calls[i][k] += v / rounds
    return [OpProfile(label, dict(m), dict(c)) for (label, _, _), m, c in zip(calls, acc_ms, acc_calls)]


def category_table(profiles: Sequence[OpProfile], ideals: Optional[Sequence[float]] = None) -> str:
    """ms per forward per category and method, each with its share; with ``ideals`` (FLOPs-ideal speed-ups, the
    first profile being ``none``) also the excess over the FLOPs-ideal time per category."""
    base = profiles[0].by_category()
    head = ["category"] + [p.label for p in profiles]
    rows = []
    for c in CATEGORY_ORDER + ("total",):
        cells = [c]
        for j, p in enumerate(profiles):
            cat = p.by_category()
            ms = p.total_ms if c == "total" else cat[c]
            share = 100.0 * ms / p.total_ms if p.total_ms else 0.0
            cell = f"{ms:.{_dp(ms)}f} ({share:.0f}%)"
            if ideals is not None and j > 0:
                b = sum(base.values()) if c == "total" else base[c]
                ex = ms - b / ideals[j]
                cell += f" {ex:+.{_dp(ex)}f}"
            cells.append(cell)
        rows.append(cells)
    return _align([head] + rows)


def top_ops_table(profiles: Sequence[OpProfile], top: int = 12) -> str:
    """The ``top`` ops by self time in any method: ms per forward (calls per forward) in each method."""
    score: Dict[str, float] = defaultdict(float)
    for p in profiles:
        for op, ms in p.ops.items():
            score[op] = max(score[op], ms)
    ops = sorted(score, key=lambda o: -score[o])[:top]
    head = ["op", "category"] + [p.label for p in profiles]
    rows = [[op.replace("aten::", ""), category(op)]
            + [f"{p.ops.get(op, 0.0):.1f} ({p.calls.get(op, 0):.0f})" for p in profiles] for op in ops]
    return _align([head] + rows)


def _dp(ms: float) -> int:
    """Decimals for a time in ms: none from 100 ms, one below."""
    return 0 if abs(ms) >= 100 else 1


def _align(cells: List[List[str]]) -> str:
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    lines = ["  ".join(format(c, ("<" if j == 0 else ">") + str(w)) for j, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["CATEGORIES", "OpProfile", "category", "category_table", "profile_calls", "top_ops_table"]
