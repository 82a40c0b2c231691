"""ToMe — Token Merging (Bolya et al., ICLR 2023; official code facebookresearch/ToMe).

Where: inside a layer, after the attention residual and before the MLP (``where = "mid"``), in every layer of the
ViT (ALBEF-style models) or of the joint encoder (ViLT) by default. At each such layer ``r`` tokens merge:

1. metric = the layer's keys averaged over heads (B, T, d); similarity = cosine;
2. bipartite soft matching: alternate split A/B of the current sequence ([CLS] in A, protected by -inf); each A
   token's best B partner is its edge; the ``r`` best edges merge (``functional.bipartite_soft_matching``);
3. size-weighted average merge: a merged token = sum size_i x_i / sum size_i over its members; sizes add up;
   provenance merges with logical OR (``functional.merge_wavg`` / ``merge_source``);
4. proportional attention (default on): the layers that follow add log(size) to their attention logits
   (``TokenState.prop_attn``; an additive float mask, SDPA stays in use).

Options (``ReduceConfig("tome", layers=..., options={...})``; ``keep`` is not used):
    r:         int, or one int per layer; default floor((N - 1) / (n + 1)) for n reduction layers and N patches,
               which leaves about N / (n + 1) candidates and is always valid.
    schedule:  "constant" (default) or "decreasing": ToMe's inflect = -1 schedule, a linear ramp from 2r at the
               first reduction layer down to 0 at the last (the same total number of merges). Only with an int r.
    prop_attn: proportional attention after the first merge (default True).

Choices where the paper and the official code leave room:
- r larger than (M - 1) // 2 for the M candidates at a layer raises (never a silent clamp), also when checked at build time
  for the configured image size. This is one stricter than ToMe's clamp, which allows M // 2.
- r = 0 at a layer is exactly the identity (the layer is skipped, no bias is added).
- Token order follows ToMe, not spatial order: [CLS, unmerged A tokens (spatial order), B tokens (spatial
  order)]; the next layer's alternating split runs over this order, as in ToMe. Provenance gives positions.
- Masked training paths of other methods are not supported in the same model (raises).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Union

from . import functional as Fn
from .registry import Option, ReduceConfig, Reducer, check_layers, register
from .select import slot_group
from .slots import Plan, SlotInput, apply_plan
from .state import ReduceContext, TokenState

SCHEDULES = ("constant", "decreasing")
OPTIONS = {"r": Option(None, optional=True, allowed="an integer >= 0 or one per layer"),
           "schedule": Option("constant", "choice", choices=SCHEDULES), "prop_attn": Option(True, "bool")}


def tome_schedule(r: Union[None, int, Sequence[int]], layers: Sequence[int], num_patches: int, schedule: str) -> List[int]:
    """Merges per reduction layer, checked so that every layer has r <= (M - 1) // 2 for its M candidates."""
    if schedule not in SCHEDULES:
        raise ValueError(f"tome: schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    n = len(layers)
    if r is None:
        r = (num_patches - 1) // (n + 1)
    if isinstance(r, (list, tuple)):
        if schedule != "constant":
            raise ValueError("tome: a per-layer r list cannot be combined with schedule='decreasing'")
        if len(r) != n:
            raise ValueError(f"tome: r schedule has {len(r)} values but there are {n} layers {list(layers)}")
        rs = list(r)
    elif isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"tome: r must be an int or a list of ints, got {r!r}")
    elif schedule == "decreasing" and n > 1:
        rs = [int(2 * r - 2 * r * i / (n - 1)) for i in range(n)]
    else:
        rs = [r] * n
    m = num_patches
    for layer, ri in zip(layers, rs):
        if isinstance(ri, bool) or not isinstance(ri, int) or ri < 0:
            raise ValueError(f"tome: r must be integers >= 0, got {ri!r} at layer {layer}")
        if ri > (m - 1) // 2:
            raise ValueError(
                f"tome: r={ri} at layer {layer} is too large for its {m} candidate tokens; r must be in [0, {(m - 1) // 2}]"
            )
        m -= ri
    return rs


class ToMeReducer(Reducer):
    """Merges ``r`` tokens by bipartite soft matching on the layer's head-mean keys."""

    where = "mid"
    method = "tome"

    def __init__(self, r: int, prop_attn: bool = True) -> None:
        super().__init__()
        self.r = r
        self.prop_attn = prop_attn

    def extra_repr(self) -> str:
        return f"r={self.r}, prop_attn={self.prop_attn}"

    def forward(self, state: TokenState, slot: SlotInput, ctx: ReduceContext) -> TokenState:
        if state.mask is not None:
            raise ValueError("tome cannot merge tokens on a masked training path (state.mask is set)")
        if self.r == 0:
            return state.record(ctx.layer, self.method)  # exactly the identity
        matching = Fn.bipartite_soft_matching(slot.keys.mean(dim=1), self.r)  # keys averaged over heads
        return apply_plan(state, Plan(merge=matching, prop_attn=self.prop_attn), ctx.layer, self.method)


def merge_point(name: str, f: float, schedule: dict, vision) -> ReduceConfig:
    """The operating point keeping about ``f`` of the image tokens: at each of the schedule's n layers ToMe merges
    as many tokens as a keep-rate method at keep ``f ** (1 / n)`` would remove (it keeps ``ceil(keep * M)`` of its M
    candidates and fuses the rest into one)."""
    layers = tuple(schedule["layers"])
    keep, counts = round(f ** (1 / len(layers)), 4), [vision.num_patches]
    for _ in layers:
        counts.append(math.ceil(keep * counts[-1]) + 1)
    return ReduceConfig(name, layers=layers, options={"r": [a - b for a, b in zip(counts, counts[1:])]})


@register("tome", groups=("vision", "joint"), placement="mid", options=OPTIONS, title="ToMe", point=merge_point)
def build(cfg: ReduceConfig, model, opts: dict) -> None:
    if cfg.keep is not None:
        raise ValueError(f"tome merges r tokens per layer (options={{'r': ...}}); keep must be None, got {cfg.keep!r}")
    _, slots = slot_group(model, "tome")
    layers = cfg.layers if cfg.layers is not None else tuple(range(1, len(slots) + 1))
    check_layers(layers, len(slots), "tome")
    rs = tome_schedule(opts["r"], layers, model.cfg.vision.num_patches, opts["schedule"])
    for layer, r in zip(layers, rs):
        slots[layer - 1].reducer = ToMeReducer(r, bool(opts["prop_attn"]))


__all__ = ["ToMeReducer", "tome_schedule", "build"]
