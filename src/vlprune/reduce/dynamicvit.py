"""DynamicViT (Rao et al., NeurIPS 2021; official code raoyongming/DynamicViT) in the ViT of ALBEF-style models.

Where: ``where = "pre"``: the predictor runs **before** the attention of each pruning layer (default layers
``uniform_layers(3, L)`` = 4, 7, 10 of 12, 1-based; fewer in shallow models), as in the paper, whose predictors sit before blocks 3, 6, 9 (0-based) of a 12-block ViT; the
first attention affected is the pruning layer's own. Pruning layer j (1-based within the schedule) keeps the
cumulative ratio rho_j = rho^j of the original patches (``keep`` = rho, default 0.7; or one cumulative ratio per
layer, non-increasing).

Predictor (per pruning layer, DynamicViT's local + global MLP): h = GELU(Linear(LN(x))) over the candidates;
local = h[:, :, :D/2]; global = the policy-weighted mean of h[:, :, D/2:] over the tokens still kept; the
concatenation goes through Linear(D, D/2) -> GELU -> Linear(D/2, D/4) -> GELU -> Linear(D/4, 2) -> LogSoftmax.
Channel 0 is "keep".

Training (``model.train()``): hard mask = straight-through Gumbel-softmax (tau 1, ``ctx.generator``) channel 0,
multiplied by the previous mask. Tokens stay in the tensor; ``state.mask`` removes masked tokens as keys from
every later attention (a token always attends to itself; the fusion encoder's cross-attention masks them too).
The mask carries straight-through gradients into the attention (``state.POLICY_FLOOR``), as DynamicViT's
policy-multiplied softmax does.
Inference: keep physically the top ``k_j = floor(rho_j * N)`` candidates by keep log-probability (clamped to
[1, M]; N = the configured patch count), in spatial order, as the official ``int(N * ratio)``.

Each reduction appends ``AuxRecord(layer, "dynamicvit", {"mask": (B, M) hard mask, "keep_prob": (B, M),
"target": rho_j})`` to ``state.aux`` for the losses in ``vlprune.objectives.dynamicvit`` (training: over all N
candidates; inference records only ``keep_prob`` and ``target`` over the candidates present).
"""

from __future__ import annotations

import math


import torch
from torch import Tensor, nn

from . import functional as Fn
from .registry import ReduceConfig, Reducer, check_layers, register
from .select import slot_group, spread_layers
from .slots import Plan, SlotInput, apply_plan
from .state import ReduceContext, TokenState

DEFAULT_KEEP = 0.7


class ScorePredictor(nn.Module):
    """DynamicViT's predictor: tokens (B, M, D) and policy (B, M) -> log-probabilities (B, M, 2), 0 = keep."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"the predictor needs a width >= 4, got {dim}")
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        w = policy.unsqueeze(-1).to(h.dtype)
        glob = (h[..., half:] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([h[..., :half], glob.expand(-1, h.shape[1], -1)], dim=-1))


def keep_targets(keep, n: int) -> list:
    """Cumulative keep ratio per pruning layer: rho^j for a scalar rho, or the given non-increasing list."""
    if isinstance(keep, (list, tuple)):
        if len(keep) != n:
            raise ValueError(f"dynamicvit: keep schedule has {len(keep)} values but there are {n} layers")
        ts = [Fn.check_keep(v, "dynamicvit: keep") for v in keep]
        if any(b > a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"dynamicvit: cumulative keep ratios must be non-increasing, got {ts}")
        return ts
    rho = Fn.check_keep(keep, "dynamicvit: keep")
    return [rho ** (j + 1) for j in range(n)]


class DynamicViTReducer(Reducer):
    where = "pre"
    method = "dynamicvit"

    def __init__(self, dim: int, target: float, num_patches: int) -> None:
        super().__init__()
        self.predictor = ScorePredictor(dim)
        self.target = target
        self.num_patches = num_patches

    def extra_repr(self) -> str:
        return f"target={self.target:.4g}, num_patches={self.num_patches}"

    def keep_count(self, m: int) -> int:
        return max(1, min(m, math.floor(self.target * self.num_patches + 1e-9)))

    def forward(self, state: TokenState, slot: SlotInput, ctx: ReduceContext) -> TokenState:
        x = state.x
        B, T, _ = x.shape
        prev = state.mask[:, 1:] if state.mask is not None else x.new_ones(B, T - 1)
        log_p = self.predictor(x[:, 1:], prev)  # (B, M, 2)
        if self.training:
            hard = Fn.st_keep_mask(log_p, ctx.generator, prev)  # (B, M) in {0, 1}
            return apply_plan(state, Plan(mask=hard), ctx.layer, self.method).add_aux(
                ctx.layer, self.method, mask=hard, keep_prob=log_p[..., 0].exp(), target=self.target
            )
        if state.mask is not None:
            raise ValueError("dynamicvit inference got a masked state; run the whole model in eval mode")
        score = log_p[..., 0].float()
        new = apply_plan(state, Plan(scores=score, k=self.keep_count(T - 1)), ctx.layer, self.method)
        return new.add_aux(ctx.layer, self.method, keep_prob=score.exp(), target=self.target)


@register("dynamicvit", groups=("vision",), placement="pre", layers=(4, 7, 10), keep=DEFAULT_KEEP, learned=True,
          losses=("ratio", "distill", "token_distill"), stages=True, distill_tokens=True, title="DynamicViT")
def build(cfg: ReduceConfig, model, opts: dict) -> None:
    _, vision = slot_group(model, "dynamicvit")
    layers = cfg.layers if cfg.layers is not None else spread_layers(len(vision))
    check_layers(layers, len(vision), "dynamicvit")
    targets = keep_targets(DEFAULT_KEEP if cfg.keep is None else cfg.keep, len(layers))
    v = model.cfg.vision
    for layer, t in zip(layers, targets):
        vision[layer - 1].reducer = DynamicViTReducer(v.width, t, v.num_patches)


__all__ = ["ScorePredictor", "DynamicViTReducer", "keep_targets", "build"]
