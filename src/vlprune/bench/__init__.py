"""Measuring cost: FLOPs counted by running the model (attention included on CPU) and checked against an
analytic count, tokens per layer, throughput, latency, peak memory, and a pre-training step (``--train``)."""

from .flops import CountedFlops, LayerTokens, analytic_flops, count_flops, flop_counter_mode, layer_tokens, tokens_after
from .runner import BenchSettings, format_table, run_bench

__all__ = [
    "BenchSettings", "CountedFlops", "LayerTokens", "analytic_flops", "count_flops", "flop_counter_mode",
    "format_table", "layer_tokens", "run_bench", "tokens_after",
]
