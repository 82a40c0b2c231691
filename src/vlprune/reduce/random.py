"""Random selection: the schedule of the method it is compared with, indices from a seeded generator.

Options:
    like:  "trips" (default), "evit" or "elip": copy that method's default layers, keep rates, place and keep
           count. "trips"/"evit": a "mid" reducer (after the attention residual) keeping ``ceil(keep * M)``;
           "elip": a "pre" reducer at each block start keeping ``floor(ratio * N)`` of the original patches.
           ``layers``/``keep`` given in the config replace the copied ones (for "elip": block starts and ratios).
    fuse:  False (default): the unselected tokens are dropped (the plain baseline, as timm's patch dropout).
           True: they fuse into one token, their plain mean (uniform renormalised weights), appended last.
    seed:  used when no generator is passed to the model (``generator=None``, e.g. in eval): layer l (0-based)
           then draws from ``torch.Generator().manual_seed(seed * 1_000_003 + l)``, the same pattern every call,
           so eval is deterministic.

With a generator (``model(..., generator=g)``, training), each reduction first draws one 62-bit seed from ``g``
and then a fresh generator of that seed (on ``g``'s device) draws the (B, M) scores row by row. So sample i's
choice depends only on the generator state, the layer and i's position in the batch: never on the other samples
nor on the batch size (a batch's first b samples choose as the batch of those b samples alone). A sample moved to
another position gets other random patches; nothing more is possible without a per-sample key.
"""

from __future__ import annotations



import torch
from torch import Tensor, nn

from . import elip, evit, trips
from . import functional as F
from .registry import Option, ReduceConfig, check_layers, per_layer, register
from .select import RateReducer, check_keeps, default_layers, rate_point, slot_group
from .slots import Plan, SlotInput
from .state import ReduceContext, TokenState

# like -> (default layers, default keep, where, count): count "current" = ceil(keep * M), "original" = floor(r * N)
SCHEDULES = {
    "trips": (trips.DEFAULT_LAYERS, trips.DEFAULT_KEEP, "mid", "current"),
    "evit": (evit.DEFAULT_LAYERS, evit.DEFAULT_KEEP, "mid", "current"),
    "elip": (elip.DEFAULT_STARTS, elip.DEFAULT_RATIOS, "pre", "original"),
}


def layer_generator(ctx: ReduceContext, seed: int) -> torch.Generator:
    """The generator of one reduction call: derived from ``ctx.generator`` or, without one, from ``seed`` and the layer."""
    g = ctx.generator
    if g is None:
        return torch.Generator().manual_seed(seed * 1_000_003 + ctx.layer)
    s = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
    return torch.Generator(device=g.device).manual_seed(s)


def random_select(state: TokenState, ctx: ReduceContext, seed: int) -> Tensor:
    """Where random picks its tokens: uniform scores (B, M) per sample from the call's generator (top-k = random k)."""
    B, M = state.x.shape[0], state.num_tokens - 1
    return F.random_scores(B, M, layer_generator(ctx, seed), state.x.device)


class RandomReducer(RateReducer):
    method = "random"

    def __init__(self, keep: float, where: str, count: str, fuse: bool, seed: int) -> None:
        super().__init__(keep)
        self.where, self.count, self.fuse, self.seed = where, count, fuse, seed

    def extra_repr(self) -> str:
        return f"keep={self.keep}, where={self.where}, count={self.count}, fuse={self.fuse}, seed={self.seed}"

    def keep_count(self, state: TokenState, ctx: ReduceContext) -> int:
        if self.count == "original":
            return F.original_keep_count(self.keep, elip.original_patch_count(state, ctx), state.num_tokens - 1)
        return super().keep_count(state, ctx)

    def plan(self, state: TokenState, slot: SlotInput, ctx: ReduceContext, k: int) -> Plan:
        scores = random_select(state, ctx, self.seed)
        ones = torch.ones_like(scores) if self.fuse else None  # fuse: the plain mean of the rest
        return Plan(scores=scores, k=k, fuse="renorm" if self.fuse else None, fuse_weights=ones)


OPTIONS = {"like": Option("trips", "choice", choices=tuple(SCHEDULES)), "fuse": Option(False, "bool"),
           "seed": Option(0, "int", lo=0)}


@register("random", groups=("vision", "joint"), placement="mid (like elip: pre)", options=OPTIONS, title="random",
          point=rate_point)
def build_random(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install random selection with the schedule of ``like`` (or the config's own layers/keep)."""
    like, fuse, seed = opts["like"], opts["fuse"], opts["seed"]
    d_layers, d_keep, where, count = SCHEDULES[like]
    group, layers_ = slot_group(model, "random")
    if where == "pre" and group != "vision":
        raise ValueError(f"random like='elip' prunes before a ViT layer; this model has only "
                         f"{sorted(model.reduction_slots())} slots")
    L = len(layers_)
    layers = cfg.layers if cfg.layers is not None else default_layers(f"random (like={like})", d_layers, L)
    check_layers(layers, L, "random")
    keep = d_keep if cfg.keep is None else cfg.keep
    if cfg.keep is None and isinstance(keep, tuple) and len(keep) != len(layers):
        raise ValueError(f"random like={like!r}: give keep= for your {len(layers)} layers {list(layers)}")
    keeps = check_keeps(per_layer(keep, layers, "random"), layers, "random")
    for l, kp in zip(layers, keeps):
        layers_[l - 1].reducer = RandomReducer(kp, where, count, fuse, seed)
