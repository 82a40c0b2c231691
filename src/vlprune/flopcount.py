"""Counting FLOPs by running a model: ``flop_counter_mode()`` is ``torch.utils.flop_counter.FlopCounterMode`` that
also counts scaled-dot-product attention on CPU.

Out of the box the counter does not know ``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel SDPA runs
on CPU), so attention would count as 0 on CPU; ``CPU_SDPA_FLOPS`` adds that op and its backward with PyTorch's own
SDPA formulas. It sits low in the import order because both the evaluation (``tasks.evaluation``) and the benchmark
(``bench.flops``) count with it.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# Formulas for the CPU attention kernels FlopCounterMode does not know (passed as ``custom_mapping``, so
# torch's global registry is left untouched). Any op already in torch's registry is not overridden.
CPU_SDPA_FLOPS = {
    op: fn
    for op, fn in (
        (getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None), _cpu_sdpa_flops),
        (getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), _cpu_sdpa_backward_flops),
    )
    if op is not None and op not in flop_counter.flop_registry
}


def flop_counter_mode() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts SDPA attention on CPU."""
    return FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
