"""How a command runs on its machine: CPU threads, numeric precision and ``torch.compile``.

Threads. ``--threads N`` sets torch's intra-op threads. Without it the default is the cores this process may run
on (``os.sched_getaffinity``) divided by the processes that share them: the ranks of a distributed run on this
machine (``LOCAL_WORLD_SIZE``, set by ``torchrun``) times any parallel stages of the calling command. An
``OMP_NUM_THREADS`` set in the environment is respected (torch already reads it), so a launcher that sets it wins
over the division. ``thread_info()`` is what runs record: the threads in use, where the number came from, the
cores, the processes and the ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` settings.

Precision. ``fp32`` runs as is. ``bf16`` and ``fp16`` run the forward (and a training step's loss) under
``torch.autocast``: on CUDA both (fp16 with a gradient scaler in training); on CPU bf16 where the CPU has native
bf16 kernels (AVX512-BF16 / AMX) or at least oneDNN, and fp16 only where oneDNN reports native fp16 kernels
(AVX512-FP16 / AMX-FP16); elsewhere fp16 on CPU is refused with a message, since it would run on slow
reference kernels. Reductions' scores are computed in fp32 whatever the precision (``reduce.functional``).

Compile. ``--compile`` compiles a model's transformer layers with ``torch.compile`` (inductor). On CPU inductor needs a C++
compiler; without one, or when compilation fails, the model runs eagerly and a warning says why
(``torch._dynamo`` is told to fall back to eager on a compile error instead of raising).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Any, Dict, Iterator, List, Optional

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# how the current thread count was chosen (set by apply_threads)
_THREADS_SOURCE = {"source": "torch default", "processes": 1}


# ---- threads ----------------------------------------------------------------------------------------------------


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def local_processes(parallel: int = 1) -> int:
    """Processes sharing this machine's cores: the local ranks of a distributed run (``LOCAL_WORLD_SIZE``, else 1)
    times ``parallel`` (stages the command itself runs at the same time)."""
    try:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        ranks = 1
    return max(1, ranks) * max(1, int(parallel))


def default_threads(parallel: int = 1) -> int:
    """The default torch threads: available cores // processes sharing them, at least 1."""
    return max(1, available_cores() // local_processes(parallel))


def max_threads() -> int:
    """The most torch threads a command accepts: 4 per logical CPU of the machine (more only slows a run down,
    and very large counts crash the native thread pools)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(threads, flag: str = "--threads") -> int:
    """``threads`` when it is an integer in [1, max_threads()]; else ValueError naming the range."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{flag} must be an integer >= 1, got {threads!r}")
    if threads > max_threads():
        raise ValueError(f"{flag} must be at most {max_threads()} (4 per logical CPU of this machine: "
                         f"{os.cpu_count() or 1}), got {threads!r}")
    return threads


def apply_threads(threads: Optional[int] = None, parallel: int = 1) -> Dict[str, Any]:
    """Set torch's intra-op threads: ``threads`` (``--threads``), else ``OMP_NUM_THREADS`` when set in the
    environment, else ``default_threads(parallel)``. Returns ``thread_info()``."""
    if threads is not None:
        check_threads(threads)
        n, source = threads, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        n, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        n, source = default_threads(parallel), "cores/processes"
    if source == "--threads" or torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _THREADS_SOURCE.update(source=source, processes=local_processes(parallel))
    log.info("torch threads: %d (%s; %d core(s), %d process(es))", n, source, available_cores(),
             local_processes(parallel))
    return thread_info()


def thread_info() -> Dict[str, Any]:
    """What a run records about its threads: {"threads", "threads_source", "cores_available", "processes",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS"} (the environment values as strings, None when unset)."""
    info: Dict[str, Any] = {"threads": torch.get_num_threads(), "threads_source": _THREADS_SOURCE["source"],
                            "cores_available": available_cores(), "processes": _THREADS_SOURCE["processes"]}
    info.update({k: os.environ.get(k) for k in THREAD_ENV})
    return info


# ---- precision --------------------------------------------------------------------------------------------------


def check_precision(precision: str, device: torch.device | str, flag: str = "--precision") -> str:
    """Validate ``precision`` for ``device``; errors name the flag, the value and what is allowed."""
    if precision not in PRECISIONS:
        raise ValueError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    if precision == "fp32" or dev.type == "cuda":
        if dev.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{flag} bf16: this GPU has no bf16 support; use fp16 or fp32")
        return precision
    if dev.type != "cpu":
        raise ValueError(f"{flag} {precision} is supported on cpu and cuda, not on {dev.type}")
    if precision == "fp16" and not _cpu_fp16_supported():
        raise ValueError(f"{flag} fp16 on CPU: this CPU has no native fp16 kernels (AVX512-FP16 / AMX-FP16), so fp16 "
                         "would run on slow reference kernels; use bf16 (or fp32)")
    return precision


def _cpu_fp16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision (None for fp32)."""
    return _DTYPES.get(precision)


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device | str) -> Iterator[None]:
    """``torch.autocast`` on ``device`` with the precision's dtype (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


# ---- torch.compile ----------------------------------------------------------------------------------------------


def compile_unavailable(device: torch.device | str) -> Optional[str]:
    """Why ``torch.compile`` (inductor) cannot run here, or None when it can be tried."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if torch.device(device).type == "cpu":
        try:
            from torch._inductor import config as ind

            cxx = ind.cpp.cxx[-1] if isinstance(ind.cpp.cxx, (tuple, list)) else ind.cpp.cxx
        except Exception:  # noqa: BLE001 - any import problem means inductor is unusable
            return "torch._inductor cannot be imported"
        names = [cxx] if cxx else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names if n):
            return f"inductor on CPU needs a C++ compiler and none was found ({', '.join(n for n in names if n)})"
    return None


def repeated_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The repeated blocks of ``model``: the entries of every ``nn.ModuleList`` that holds two or more modules of one
    class (its transformer layers), outermost lists only."""
    blocks: List[torch.nn.Module] = []
    inside: set = set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, torch.nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            blocks.extend(m)
            inside.add(name)
    return blocks


def maybe_compile(model: torch.nn.Module, enabled: bool, device: torch.device | str,
                  dynamic: Optional[bool] = False) -> bool:
    """Compile ``model``'s transformer layers in place when ``enabled`` ("regional" compilation: each repeated
    block's forward is compiled with ``nn.Module.compile``, so the modules, parameters and state dict stay the
    same, whatever entry point a task calls, and layers of one class and shape share one compiled graph).
    ``dynamic=False`` (default): shapes are specialised, which suits the static token counts of fixed keep
    rates (each new token count or batch size compiles once more). A model without repeated blocks is compiled
    whole. Returns whether anything was compiled; when it cannot be, logs a warning saying why and leaves the
    model eager. A failure during a compiling call falls back to eager with a warning from torch
    (``suppress_errors``)."""
    if not enabled:
        return False
    why = compile_unavailable(device)
    if why is not None:
        log.warning("--compile: %s; running eagerly", why)
        return False
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))  # ToMe: a shape per layer
    blocks = repeated_blocks(model) or [model]
    for b in blocks:
        b.compile(dynamic=dynamic)
    log.info("--compile: compiled %d block(s) of %s", len(blocks), type(model).__name__)
    return True


__all__ = ["PRECISIONS", "apply_threads", "autocast_dtype", "available_cores", "check_precision", "check_threads",
           "max_threads",
           "compile_unavailable", "default_threads", "local_processes", "maybe_compile", "precision_context", "repeated_blocks",
           "thread_info"]
