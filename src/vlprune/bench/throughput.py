"""Wall-clock timing: warm-up, then the median of repeated timed runs; the largest batch that fits.

Times are taken with ``time.perf_counter`` around each call, with ``torch.cuda.synchronize`` before and after on
GPU so that queued kernels are inside the measured interval. Nothing here asserts or assumes a speed.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5) -> List[float]:
    """Seconds per call of ``fn`` for ``repeats`` timed calls after ``warmup`` untimed ones."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(
    calls: Sequence[Tuple[Callable[[], object], Callable[[], object]]], device: torch.device, warmup: int = 1,
    repeats: int = 5, cpu_times: Optional[List[List[float]]] = None, tick: Optional[Callable[[], object]] = None,
) -> List[List[float]]:
    """Seconds per call for several workloads timed round-robin: ``calls`` are (setup, fn) pairs; ``setup()``
    (untimed, e.g. installing a method) runs before each timed ``fn()``. Every workload gets ``warmup`` untimed
    calls, then ``repeats`` rounds each time every workload once, in an order rotated by one each round.
    Returns one list of ``repeats`` times per workload. ``cpu_times``, when given (an empty list), receives the
    same for the CPU time of this process (all its threads, ``time.process_time``): on a machine shared with other
    jobs that is the work done, without the time spent waiting for a core. ``tick()``, when given, is called after
    every call, warm-up ones included (``(warmup + repeats) * len(calls)`` in all): a progress bar's update."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    n = len(calls)
    for setup, fn in calls:
        setup()
        for _ in range(warmup):
            fn()
            if tick is not None:
                tick()
    times: List[List[float]] = [[] for _ in range(n)]
    cpu: List[List[float]] = [[] for _ in range(n)]
    for r in range(repeats):
        for i in [(r + j) % n for j in range(n)]:
            setup, fn = calls[i]
            setup()
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
            if tick is not None:
                tick()
    if cpu_times is not None:
        cpu_times[:] = cpu
    return times


@contextmanager
def calls_bar(progress, total: int, desc: str) -> Iterator[Callable[[], object]]:
    """A progress bar (stderr, with an ETA) over ``total`` timed calls; yields its update function. Shown only when
    ``progress`` (the bench's message callback) has a true ``bars`` attribute, as the CLI's has without --quiet."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="call", disable=not getattr(progress, "bars", False),
               dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar.update
    finally:
        bar.close()


def median_time(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call (see ``time_call``)."""
    return statistics.median(time_call(fn, device, warmup, repeats))


def is_oom(e: BaseException) -> bool:
    """True for an out-of-memory error (CUDA allocator, or a CPU allocation failure)."""
    if isinstance(e, (getattr(torch.cuda, "OutOfMemoryError", MemoryError), MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in msg for s in ("out of memory", "can't allocate", "cannot allocate"))


def find_max_batch(fits: Callable[[int], bool], start: int = 1, cap: int = 4096) -> int:
    """Largest batch size ``b`` in [1, cap] with ``fits(b)``: double from ``start`` until it fails, then bisect.

    ``fits`` runs the workload at batch ``b`` and says whether it fitted (no out-of-memory error and within any
    memory budget). Assumes memory grows with the batch. Raises ValueError when not even batch ``start`` fits.
    """
    if cap < 1 or start < 1 or start > cap:
        raise ValueError(f"need 1 <= start <= cap, got start={start}, cap={cap}")
    if not fits(start):
        raise ValueError(f"not even batch size {start} fits in the memory available")
    good, bad = start, None
    while bad is None and good < cap:
        trial = min(cap, good * 2)
        if fits(trial):
            good = trial
        else:
            bad = trial
    if bad is None:
        log.info("max batch search stopped at the cap %d", cap)
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def fits_budget(run: Callable[[int], Optional[float]], budget_mb: Optional[float], device: torch.device) -> Callable[[int], bool]:
    """Wrap ``run(b) -> memory used in MiB (or None)`` into ``fits(b)`` for ``find_max_batch``: an OOM error or a
    measured use above ``budget_mb`` means "does not fit". On CPU a budget is required (no OOM error comes in
    time to stop the search before the machine swaps)."""
    if device.type != "cuda" and budget_mb is None:
        raise ValueError("the largest-batch search on CPU needs a memory budget (--mem-budget GB)")

    def fits(b: int) -> bool:
        try:
            used = run(b)
        except Exception as e:  # noqa: BLE001 - only OOM is "does not fit"; anything else is re-raised
            if not is_oom(e):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log.info("batch %d: out of memory", b)
            return False
        ok = budget_mb is None or (used is not None and used <= budget_mb)
        if budget_mb is not None and used is None:
            raise ValueError("memory cannot be measured on this platform, so a memory budget cannot be checked")
        log.info("batch %d: %s MiB -> %s", b, "n/a" if used is None else f"{used:.0f}", "fits" if ok else "too big")
        return ok

    return fits


__all__ = ["calls_bar", "time_call", "time_interleaved", "median_time", "find_max_batch", "fits_budget", "is_oom"]
