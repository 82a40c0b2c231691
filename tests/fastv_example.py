"""FastV-style example method, the one ``docs/methods.md`` walks through: drop the image tokens the text attends to
least in a chosen fusion layer. It lives only in the tests; ``conftest.py`` imports it (which registers it), and
its test case is ``CASES["fastv"]`` in ``method_cases.py``, so every generic method test runs on it. From this module
alone it is also in ``vlprune info`` and its methods table, in ``vlprune.patch`` (on ViLT, whose joint slots it fits),
in ``vlprune bench`` and in the demo's operating points (``title`` and ``point`` below);
``test_reduce_registry.test_a_new_method_appears_everywhere_from_its_module`` checks that.

Where: a fusion layer of a two-stream model, after the text's cross-attention and before the MLP (the following
fusion layers see only the kept image tokens); in a single-stream model, a joint layer (the text rows' attention
over the image keys). Score of candidate i: the cross-attention weight the text gives it,
averaged over heads and over the real (unpadded) text tokens. Keep ``ceil(keep * M)``; the rest are dropped.
Defaults: fusion layer 2 of 6 (FastV's K = 2), keep 0.5.
"""

from __future__ import annotations

from torch import nn

from vlprune.reduce import functional as F
from vlprune.reduce.registry import ReduceConfig, register
from vlprune.reduce.select import RateReducer, rate_point, rate_schedule
from vlprune.reduce.slots import Plan, SlotInput
from vlprune.reduce.state import ReduceContext, TokenState

DEFAULT_LAYERS = (2,)
DEFAULT_KEEP = 0.5


def text_attention_plan(slot: SlotInput, state: TokenState, k: int) -> Plan:
    """Where FastV picks its tokens: the k candidates with the most attention from the real text tokens."""
    attn = F.head_mean_attention(slot.text_queries, slot.keys, state.cross_attention_bias(slot.keys.dtype))  # (B, L, T)
    real = slot.text_mask.to(attn.dtype)[..., None]  # (B, L, 1): padding does not vote
    scores = (attn * real).sum(1) / real.sum(1)  # (B, T)
    return Plan(scores=scores[:, 1:], k=k, fuse=None)  # the image [CLS] stays; the rest are dropped


class FastVReducer(RateReducer):
    where = "mid"
    method = "fastv"

    def plan(self, state: TokenState, slot: SlotInput, ctx: ReduceContext, k: int) -> Plan:
        return text_attention_plan(slot, state, k)


@register("fastv", groups=("fusion", "joint"), placement="mid", layers=DEFAULT_LAYERS, keep=DEFAULT_KEEP, text_guided=True,
          title="FastV (example)", point=rate_point)
def build_fastv(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    slots, schedule = rate_schedule(cfg, model, depth=6)  # the declared defaults are for 6 fusion layers
    for layer, keep in schedule:
        slots[layer - 1].reducer = FastVReducer(keep)
