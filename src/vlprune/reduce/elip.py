"""ELIP: vision token pruning and merging guided by a mixed [CLS] (the ELIP paper; official code guoyang9/ELIP,
ALBEF/models/vit.py, read to understand it).

Blocks of the ViT: pruning blocks start at layers 3, 5 and 11 and span 2, 6 and 2 layers (of 12); layers before the
first block are untouched. At block b, keep ``k_b = floor(ratio_b * N)`` of the **original** patch count N
(ratios 0.90, 0.65, 0.40), clamped to 1 <= k_b <= M. The guide is ``cls' = lam * img_cls + (1 - lam) * t_cls``
(lam = 0.8). The unselected candidates fuse into one token with weights ``a_i / (sum_unselected a + 1e-6)``
(renormalised), appended last; from then on it is an ordinary candidate. Selection weights carry no gradient
(stop-gradient); the token values do.

Configuration: ``layers`` are the 1-based block **starts**, ``keep`` the block ratios (of N, non-increasing),
option ``spans`` the number of layers of each block (default: each block runs up to the next start, the last to
the end, which gives (2, 6, 2) for starts (3, 5, 11) of 12 layers); options ``lam`` and ``lookahead``. On a
model of another depth without ``layers=``, the starts are ``uniform_layers(3, L)`` (logged as a warning).

``lookahead=True`` (official): a "pre" reducer at the start of each block runs, under ``no_grad``, a detached copy
of the block's input whose [CLS] is replaced by cls' through all layers of the block (``ctx.encoder.layers``),
and scores the candidates by the head-averaged attention row of [CLS] in the block's **last** layer (softmax over
all keys, candidates' part, as the official ``attn.mean(1)[:, 0, 1:]``). The **real** block input (whose [CLS]
stays the image [CLS]) is pruned before the block's first layer. The last layer of the look-ahead computes only
its keys and the [CLS] query, not its full attention.

``lookahead=False`` (our cheaper variant, no extra pass): a "mid" reducer in the layer **preceding** the block
(layer s - 1 for a block starting at s; so a block cannot start at layer 1). After that layer's attention
residual, cls' is built from the current image [CLS] and t_cls, projected with that layer's own LN1 and W_q, and
scored against that layer's own keys (softmax over all keys, candidates' part, head mean). The pruning happens
there, before the MLP of layer s - 1: one MLP earlier than the look-ahead variant, the same place TRIPS and EViT
prune. Traces record the layer where the pruning happened (s for look-ahead, s - 1 without).

``count_cls=True`` counts the image [CLS] in N, as ELIP's CLIP code does (197 tokens for 196 patches: 177 / 128 /
78 kept instead of our 176 / 127 / 78); its ALBEF code counts the patches only, as our default.

N is the original patch count of the forward pass, which the image encoder puts in ``ctx.num_patches``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import check_pos_int
from . import functional as F
from .registry import Option, ReduceConfig, check_layers, register
from .select import SelectReducer, check_unmasked, default_layers, outside_query_bias, require_guide, slot_group
from .slots import Plan, SlotInput
from .state import ReduceContext, TokenState

DEFAULT_STARTS = (3, 5, 11)
DEFAULT_RATIOS = (0.90, 0.65, 0.40)
DEFAULT_LAM = 0.8


@torch.no_grad()
def lookahead_scores(x: Tensor, guide: Tensor, lam: float, layers: Sequence[nn.Module], bias: Optional[Tensor]) -> Tensor:
    """Where ELIP (look-ahead) picks its tokens: [CLS]-row attention of the block's last layer, (B, M), no grad.

    x (B, 1 + M, D) is the block input; its [CLS] is replaced by cls' in a detached copy that runs through all
    but the last layer of the block (``layer.plain``: no reducer); the last layer gives keys and the cls' query
    only (``cls_query_and_keys``). bias: the state's self-attention bias (B, 1, 1 or T, T) or None.
    """
    h = x.detach()
    h = torch.cat([F.elip_guide(h[:, :1], guide.detach()[:, None], lam), h[:, 1:]], dim=1)  # cls'
    for layer in layers[:-1]:
        h = layer.plain(h, bias)
    q_cls, k = layers[-1].cls_query_and_keys(h)
    row_bias = None if bias is None else bias[:, :, :1]
    return F.cls_attention_scores(q_cls, k, row_bias)


def guided_scores(state: TokenState, slot: SlotInput, guide: Tensor, lam: float) -> Tensor:
    """Where ELIP (no look-ahead) picks its tokens: cls' against this layer's own keys, (B, M), no grad."""
    cls_p = F.elip_guide(state.x[:, 0], guide, lam)
    q = slot.project_query(cls_p[:, None])
    k = slot.keys
    return F.cls_attention_scores(q, k, outside_query_bias(state, k.dtype)).detach()  # stop-gradient on the weights


def original_patch_count(state: TokenState, ctx: ReduceContext) -> int:
    """N, the original patch count: set by the image encoder in ``ctx.num_patches``; without it, the total size
    of the tokens minus [CLS] (exact only while nothing was dropped)."""
    if ctx.num_patches is not None:
        return ctx.num_patches
    return int(round(float(state.size[0].float().sum()))) - 1


class ElipReducer(SelectReducer):
    """One ELIP pruning step. ``lookahead=True``: "pre" at the block's first layer; else "mid" in the layer before."""

    method = "elip"

    def __init__(self, ratio: float, span: int, lam: float, lookahead: bool, count_cls: bool = False) -> None:
        super().__init__()
        self.ratio, self.span, self.lam, self.lookahead = F.check_keep(ratio, "ratio"), span, lam, lookahead
        self.count_cls = count_cls
        self.where = "pre" if lookahead else "mid"

    def extra_repr(self) -> str:
        extra = ", count_cls=True" if self.count_cls else ""
        return f"ratio={self.ratio}, span={self.span}, lam={self.lam}, lookahead={self.lookahead}{extra}"

    def check(self, state: TokenState, ctx: ReduceContext) -> None:
        check_unmasked(state, self.method)
        require_guide(ctx, state, self.method)

    def keep_count(self, state: TokenState, ctx: ReduceContext) -> int:
        M = state.num_tokens - 1
        n = original_patch_count(state, ctx) + (1 if self.count_cls else 0)  # count_cls: ELIP's CLIP code, N + 1
        return F.original_keep_count(self.ratio, n, M)  # k_b = floor(ratio_b * N)

    def plan(self, state: TokenState, slot: SlotInput, ctx: ReduceContext, k: int) -> Plan:
        if self.lookahead:
            if ctx.encoder is None:
                raise ValueError("elip lookahead=True needs ctx.encoder (the encoder running the layers)")
            block = list(ctx.encoder.layers[ctx.layer : ctx.layer + self.span])
            a = lookahead_scores(state.x, ctx.guide, self.lam, block, state.attn_bias(state.x.dtype))
        else:
            a = guided_scores(state, slot, ctx.guide, self.lam)
        return Plan(scores=a, k=k, fuse="renorm")  # a_i / (sum a + 1e-6)


def block_spans(starts: Sequence[int], spans: Optional[Sequence[int]], num_layers: int) -> List[int]:
    """Validate (or derive) the spans of blocks starting at 1-based ``starts``; errors name the values."""
    if spans is None:
        return [b - a for a, b in zip(starts, list(starts[1:]) + [num_layers + 1])]
    if not isinstance(spans, (list, tuple)) or len(spans) != len(starts):
        raise ValueError(f"elip: spans must give one span per block start {list(starts)}, got {spans!r}")
    ends = list(starts[1:]) + [num_layers + 1]
    for s, n, nxt in zip(starts, spans, ends):
        check_pos_int(f"elip: span of the block starting at layer {s}", n)
        if s + n > nxt:
            what = f"the next block start {nxt}" if nxt <= num_layers else f"the last layer {num_layers}"
            raise ValueError(
                f"elip: the block starting at layer {s} with span {n} ends at layer {s + n - 1}, past {what}"
            )
    return list(spans)


OPTIONS = {"lam": Option(DEFAULT_LAM, "float", lo=0.0, hi=1.0), "lookahead": Option(True, "bool"),
           "spans": Option(None, optional=True, allowed="one span (an integer >= 1) per block start"),
           "count_cls": Option(False, "bool")}


def block_point(name: str, f: float, schedule: dict, vision) -> ReduceConfig:
    """The operating point keeping about ``f`` of the image tokens: the schedule's keep ratios scaled so that the
    last block keeps ``f`` (each at most 1)."""
    base = tuple(schedule["keep"])
    return ReduceConfig(name, layers=tuple(schedule["layers"]), keep=tuple(min(1.0, round(b * f / base[-1], 4)) for b in base))


@register("elip", groups=("vision",), placement="pre (lookahead=False: mid of the layer before)",
          layers=DEFAULT_STARTS, keep=DEFAULT_RATIOS, options=OPTIONS, text_guided=True, title="ELIP", point=block_point)
def build_elip(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install ELIP in the ViT of a two-stream model (layers = block starts, keep = ratios of N)."""
    _, layers_ = slot_group(model, "elip")
    L = len(layers_)
    lam, lookahead = opts["lam"], opts["lookahead"]
    starts = cfg.layers if cfg.layers is not None else default_layers("elip", DEFAULT_STARTS, L)
    first = 1 if lookahead else 2
    if not lookahead and starts and starts[0] == 1:
        raise ValueError(
            "elip: lookahead=False scores a block with the layer before it, so no block can start at layer 1; "
            f"got block starts {list(starts)} (allowed [2, {L}])"
        )
    check_layers(starts, L, "elip", first=first, where="block start")
    spans = block_spans(starts, opts["spans"], L)
    ratios = DEFAULT_RATIOS if cfg.keep is None else cfg.keep
    if not isinstance(ratios, (list, tuple)):
        ratios = (ratios,) * len(starts)
    if len(ratios) != len(starts):
        raise ValueError(f"elip: {len(ratios)} keep ratios {list(ratios)} for {len(starts)} block starts {list(starts)}")
    ratios = [F.check_keep(r, f"elip: ratio of the block at layer {s}") for r, s in zip(ratios, starts)]
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"elip: ratios are fractions of the original patch count and must not increase, got {ratios}")
    for s, n, r in zip(starts, spans, ratios):
        slot = s - 1 if lookahead else s - 2  # 0-based: the block's first layer, or the layer before it
        layers_[slot].reducer = ElipReducer(r, n, float(lam), lookahead, bool(opts["count_cls"]))
