"""TiP — Text-informed Image Pruning (seed: the TiP paper; closest code csarron/PuMer src/pumer/model/pruner.py).

Where: the cross-modal layers. ViLT-style models: the joint encoder (slot group "joint"); ALBEF-style models: the
fusion encoder (slot group "fusion"), pruning the image tokens that the later fusion layers' text queries
cross-attend to. Default layers ``uniform_layers(3, L)`` (4, 7, 10 of 12; 2, 4, 5 of ALBEF's 6 fusion layers);
keep 0.5 of the current image tokens at each pruner (a float, or one per layer).

Placement (the paper applies the pruner to "the layer's output image tokens"): the reduction slot of a joint/fusion
layer sits after its (cross-)attention and before its MLP, so the pruner scores the post-attention, pre-MLP image
tokens of layer l; the first attention that loses the pruned tokens is layer l + 1's, exactly as when pruning
layer l's output (an MLP acts on each token alone).

Pruner: LN(H) -> Linear(H, H) -> GELU -> Linear(H, H/2) -> GELU -> Linear(H/2, H/4) -> GELU -> Linear(H/4, 2) ->
LogSoftmax over the candidates ([CLS] excluded); channel 0 = keep probability p_i.

Training: hard mask = straight-through Gumbel-softmax (tau 1, ``ctx.generator``) x the previous mask; tokens stay
in the tensor, masked as keys in image self-attention / ViLT's joint attention (a token attends to itself) and in
the fusion encoder's text-to-image cross-attention (``TokenState.cross_attention_bias``); straight-through gradients reach
the mask (``state.POLICY_FLOOR``). Inference: keep the top ``ceil(keep * M)`` by p_i physically, spatial order.

Options that restore PuMer's behaviour (defaults stay ours): ``placement="post_mlp"`` scores the layer's output
tokens, after its MLP, as PuMer does (in a joint slot; in a fusion slot the image tokens do not change inside the
layer, so both placements are the same there); ``count="pumer"`` keeps ``int((1 + M) * keep)`` tokens, counting the
image [CLS] as PuMer does, instead of ``ceil(keep * M)``.

Each reduction appends an ``AuxRecord(layer, "tip", values)`` to ``state.aux``; values (training):
    keep_prob (B, M)   p_i of every candidate in the tensor
    cum_prob  (B, M)   p_i x previous hard mask (0 for tokens already pruned): the cumulative keep probability
                       that the sparsity loss compares with the cumulative target keep^l
    target    float    cumulative keep target prod_{j <= l} keep_j
    mask      (B, M)   the hard mask
    positions (B, M)   grid index of each candidate (-1 for tokens that are not single patches), or None when
                       unknown (tokens were physically removed before and no provenance was traced)
    text_emb, image_emb (B, 192) and temp: the contrastive pair of this layer: mean-pooled text states (real
                       tokens only) and the mean of the kept image candidates, through this reducer's own linear
                       projections and learnable temperature (saved with the reducer).
Inference records only keep_prob and target. Losses: ``vlprune.objectives.tip``.

Two-stage training (the paper): stage 1 freezes the backbone (pruners + task head train, lam 0), stage 2 also
unfreezes the cross-modal layers (lam 1); the fine-tuning tasks set the stages (``tasks.finetune.set_stage``).

Text states for the contrastive term: in ViLT the joint layer's text states after its attention; in ALBEF the
fusion encoder's input text states (the text encoder's output), since a fusion reducer does not see the fusion
layer's own text states.
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor, nn

from . import functional as Fn
from .registry import Option, ReduceConfig, Reducer, check_layers, per_layer, register
from .select import slot_group, spread_layers
from .slots import Plan, SlotInput, apply_plan
from .state import ReduceContext, TokenState

DEFAULT_KEEP = 0.5
OPTIONS = {"proj_dim": Option(192, "int", lo=1), "tau": Option(1.0, "positive"),
           "placement": Option("mid", "choice", choices=("mid", "post_mlp")),
           "count": Option("ceil", "choice", choices=("ceil", "pumer"))}


def tip_keep_count(keep: float, m: int, count: str = "ceil") -> int:
    """Tokens kept by one pruner from M candidates: ours ``ceil(keep * M)``; ``count="pumer"`` PuMer's
    ``int((1 + M) * keep)`` (it counts the image [CLS] among the tokens), both clamped to 1 <= k <= M."""
    if count == "pumer":
        Fn.check_keep(keep)
        return max(1, min(m, int((1 + m) * keep)))
    return Fn.keep_count(keep, m)


class Pruner(nn.Module):
    """TiP's pruner: image tokens (B, M, H) -> log-probabilities (B, M, 2), channel 0 = keep."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"the pruner needs a width >= 4, got {dim}")
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def masked_mean(x: Tensor, w: Tensor) -> Tensor:
    """sum_i w_i x_i / sum_i w_i: x (B, M, D), w (B, M) -> (B, D)."""
    w = w.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1e-6)


class TipReducer(Reducer):
    where = "mid"
    method = "tip"

    def __init__(self, dim: int, text_dim: int, keep: float, target: float, num_patches: int,
                 proj_dim: int = 192, tau: float = 1.0, placement: str = "mid", count: str = "ceil") -> None:
        super().__init__()
        self.where = "post" if placement == "post_mlp" else "mid"  # "post": after the layer's MLP (PuMer)
        self.count = count
        self.pruner = Pruner(dim)
        self.text_proj = nn.Linear(text_dim, proj_dim)
        self.image_proj = nn.Linear(dim, proj_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.keep, self.target, self.num_patches, self.tau = keep, target, num_patches, tau

    def extra_repr(self) -> str:
        extra = "" if (self.where, self.count) == ("mid", "ceil") else f", where={self.where}, count={self.count}"
        return f"keep={self.keep}, target={self.target:.4g}{extra}"

    def forward(self, state: TokenState, slot: SlotInput, ctx: ReduceContext) -> TokenState:
        x = state.x
        B, T, _ = x.shape
        M = T - 1
        cand = x[:, 1:]
        log_p = self.pruner(cand)
        p = log_p[..., 0].exp()
        if not self.training:
            if state.mask is not None:
                raise ValueError("tip inference got a masked state; run the whole model in eval mode")
            new = apply_plan(state, Plan(scores=p.float(), k=tip_keep_count(self.keep, M, self.count)), ctx.layer, self.method)
            return new.add_aux(ctx.layer, self.method, keep_prob=p, target=self.target)
        prev = None if state.mask is None else state.mask[:, 1:]
        hard = Fn.st_keep_mask(log_p, ctx.generator, prev, self.tau)
        cum = p if prev is None else p * prev
        try:
            pos = Fn.grid_positions(state.source, B, M, self.num_patches, x.device)
        except ValueError:
            pos = None
        text_emb = image_emb = None
        if ctx.text is not None:
            tmask = torch.ones(ctx.text.shape[:2], device=x.device) if ctx.text_mask is None else ctx.text_mask
            text_emb = self.text_proj(masked_mean(ctx.text, tmask))
            image_emb = self.image_proj(masked_mean(cand, hard))
        return apply_plan(state, Plan(mask=hard), ctx.layer, self.method).add_aux(
            ctx.layer, self.method, keep_prob=p, cum_prob=cum, target=self.target, mask=hard, positions=pos,
            text_emb=text_emb, image_emb=image_emb, temp=self.temp,
        )


def cumulative(keeps: List[float]) -> List[float]:
    return [math.prod(keeps[: j + 1]) for j in range(len(keeps))]


@register("tip", groups=("joint", "fusion"), placement="mid", layers=(4, 7, 10), keep=DEFAULT_KEEP, options=OPTIONS, text_guided=True,
          learned=True, losses=("distill", "sparsity", "contrast", "continuity"), stages=True, reads_attention=False,
          title="TiP")
def build(cfg: ReduceConfig, model, opts: dict) -> None:
    group, layers_ = slot_group(model, "tip")
    layers = cfg.layers if cfg.layers is not None else spread_layers(len(layers_))
    check_layers(layers, len(layers_), "tip")
    keeps = [Fn.check_keep(v, "tip: keep") for v in per_layer(DEFAULT_KEEP if cfg.keep is None else cfg.keep, layers, "tip")]
    c = model.cfg
    dim = c.vision.width
    text_dim = c.vision.width if group == "joint" else c.text.width
    for layer, kp, tgt in zip(layers, keeps, cumulative(keeps)):
        layers_[layer - 1].reducer = TipReducer(
            dim, text_dim, kp, tgt, c.vision.num_patches, int(opts["proj_dim"]), float(opts["tau"]),
            opts["placement"], opts["count"],
        )


__all__ = ["Pruner", "TipReducer", "build", "tip_keep_count"]
