"""Peak memory of one call: the CUDA allocator's peak on GPU, the peak resident-set growth on CPU.

On CPU (Linux) the peak RSS is read from ``/proc/self/status`` (``VmHWM``) after resetting it to the current RSS
by writing ``5`` to ``/proc/self/clear_refs``; glibc's free lists are first returned to the OS with
``malloc_trim(0)`` so that memory cached from earlier calls does not hide the growth. The figure is the growth of
the whole process during the call (activations, temporaries, allocator overhead), in MiB. Where any of this is
unavailable (not Linux, not glibc, a locked-down /proc) the result is None, reported as "n/a".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import Callable, Optional, Tuple, TypeVar

import torch

log = logging.getLogger(__name__)
R = TypeVar("R")
_MIB = 1024.0 * 1024.0


def _read_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> Optional[int]:
    """Reset VmHWM to the current RSS; returns the current RSS in kB, or None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _read_status_kb("VmRSS")


def measure_peak(fn: Callable[[], R], device: torch.device) -> Tuple[R, Optional[float]]:
    """Run ``fn()`` once; return its result and the peak memory it used in MiB (None when not measurable).

    CUDA: ``max_memory_allocated`` during the call minus the memory allocated before it (the activations and
    temporaries on top of weights and inputs). CPU: the peak RSS growth during the call (see module docstring).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, (torch.cuda.max_memory_allocated(device) - base) / _MIB
    if device.type != "cpu":
        return fn(), None
    _malloc_trim()
    base = _reset_cpu_peak()
    result = fn()
    peak = _read_status_kb("VmHWM")
    if base is None or peak is None:
        return result, None
    return result, max(0, peak - base) / 1024.0


def tensor_bytes(*modules_or_tensors) -> int:
    """Bytes held by parameters and buffers of modules (and any plain tensors / optimizer states given)."""
    total, seen = 0, set()

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.data_ptr() in seen:
            return
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()

    for obj in modules_or_tensors:
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for st in obj.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        add(v)
        elif isinstance(obj, torch.Tensor):
            add(obj)
    return total


__all__ = ["measure_peak", "tensor_bytes"]
