"""Shared plumbing of the score-and-select methods (TRIPS, ELIP, EViT, random): their base class (check, count,
plan), the attention bias a score row must use and default-schedule checks.

The maths is in ``functional.py``; this module only moves TokenState fields around.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from .registry import ReduceConfig, Reducer, check_layers, get_spec, per_layer, uniform_layers
from .slots import Plan, SlotInput, apply_plan
from .state import ReduceContext, TokenState

log = logging.getLogger(__name__)


def check_unmasked(state: TokenState, method: str) -> None:
    """These methods prune physically; a state carrying a training mask of another method cannot be gathered."""
    if state.mask is not None:
        raise ValueError(f"{method} prunes tokens physically and cannot run on a masked training state")


def cls_row_bias(state: TokenState, dtype: torch.dtype) -> Optional[Tensor]:
    """The [CLS] query row of the state's own self-attention bias: (B, 1, 1, T) or None."""
    bias = state.attn_bias(dtype)
    if bias is not None and bias.shape[2] > 1:
        bias = bias[:, :, :1]
    return bias


def outside_query_bias(state: TokenState, dtype: torch.dtype) -> Optional[Tensor]:
    """Bias (B, 1, 1, T) for a query row from outside the tokens (a text or guide query) scored as if it were a
    row of the tokens' own self-attention: log(size) under ToMe's proportional attention and the training mask;
    None if neither. (The fusion encoder's cross-attention uses ``TokenState.cross_attention_bias`` instead.)"""
    return F.external_key_bias(state.size, state.mask, state.prop_attn, dtype)


def require_guide(ctx: ReduceContext, state: TokenState, method: str) -> Tensor:
    """The guide (B, D) of a text-guided method; a missing guide or a batch mismatch raises."""
    g = ctx.guide
    if g is None:
        raise ValueError(
            f"{method} is text-guided but no guide (text [CLS]) was given: run the model with captions "
            "(model(images, ids, mask) or encode_image(images, text, text_mask)); for text-free image features "
            "(e.g. retrieval's first stage) use a model without a text-guided method"
        )
    if g.dim() != 2 or g.shape[0] != state.x.shape[0]:
        raise ValueError(f"{method}: guide must have shape (B={state.x.shape[0]}, D), got {tuple(g.shape)}")
    return g


def spread_layers(num_layers: int) -> Tuple[int, ...]:
    """The learned methods' default: three pruning layers spread evenly (``uniform_layers``), 4, 7, 10 of 12 as in
    the papers; fewer in shallow models (at least 2 layers are needed)."""
    if num_layers < 2:
        raise ValueError(f"a pruning schedule needs at least 2 layers, the model has {num_layers}")
    return uniform_layers(min(3, num_layers - 1), num_layers)


def default_layers(method: str, defaults: Sequence[int], num_layers: int, depth: int = 12) -> Tuple[int, ...]:
    """The paper's default layers for a ``depth``-layer encoder; for another depth, ``uniform_layers(t, L)``.

    The papers' numbers are for 12-layer encoders. On a model of another depth (e.g. the 4- and 6-layer test and
    demo presets) we spread the same number of layers evenly (``s = L / (t + 1)``, layer ``i*s + 1``, the TRIPS
    paper's ``uniform(t)``) and log a warning naming them; pass ``layers=`` to choose. A model too shallow for
    ``t`` layers raises.
    """
    if num_layers == depth:
        return tuple(defaults)
    t = len(defaults)
    if t >= num_layers:
        raise ValueError(
            f"{method}: the default schedule has {t} layers {tuple(defaults)} (for a {depth}-layer encoder) but this "
            f"model has {num_layers} layers; pass layers=... (1-based, in [1, {num_layers}])"
        )
    layers = uniform_layers(t, num_layers)
    log.warning("%s: default layers %s are for a %d-layer encoder; this model has %d layers, using uniform_layers(%d, "
                "%d) = %s (pass layers=... to choose)", method, tuple(defaults), depth, num_layers, t, num_layers, layers)
    return layers


def slot_group(model: nn.Module, method: str) -> Tuple[str, List[nn.Module]]:
    """The first of the method's declared slot groups that the model has ("vision" for ALBEF, "joint" for ViLT)."""
    return get_spec(method).slots(model)


def check_keeps(values: Sequence[float], layers: Sequence[int], method: str, name: str = "keep") -> List[float]:
    return [F.check_keep(v, f"{method}: {name} at layer {l}") for v, l in zip(values, layers)]


def rate_schedule(cfg, model: nn.Module, depth: int = 12) -> Tuple[List[nn.Module], List[Tuple[int, float]]]:
    """The slots of a keep-rate method and its checked (1-based layer, keep) pairs: ``cfg.layers`` / ``cfg.keep``
    or the defaults its declaration gives for a ``depth``-layer encoder (``default_layers`` on another depth)."""
    spec = get_spec(cfg.name)
    _, slots = spec.slots(model)
    L = len(slots)
    layers = cfg.layers if cfg.layers is not None else default_layers(cfg.name, spec.layers, L, depth)
    check_layers(layers, L, cfg.name)
    keeps = check_keeps(per_layer(spec.keep if cfg.keep is None else cfg.keep, layers, cfg.name), layers, cfg.name)
    return slots, list(zip(layers, keeps))


class SelectReducer(Reducer):
    """A score-and-select reducer (TRIPS, ELIP, EViT, random): ``check`` the inputs, count the tokens to keep
    (``keep_count``, the one place a method computes it), and unless that keeps everything (then the state passes
    through untouched, so keep 1.0 is exactly the unpruned model) build the ``plan`` and apply it."""

    def check(self, state: TokenState, ctx: ReduceContext) -> None:
        check_unmasked(state, self.method)

    def keep_count(self, state: TokenState, ctx: ReduceContext) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def plan(self, state: TokenState, slot: SlotInput, ctx: ReduceContext, k: int) -> Plan:  # pragma: no cover
        raise NotImplementedError

    def forward(self, state: TokenState, slot: SlotInput, ctx: ReduceContext) -> TokenState:
        self.check(state, ctx)
        k = self.keep_count(state, ctx)
        if k >= state.num_tokens - 1:
            return state.record(ctx.layer, self.method)
        return apply_plan(state, self.plan(state, slot, ctx, k), ctx.layer, self.method)


class RateReducer(SelectReducer):
    """A reducer with a keep rate ``keep`` in (0, 1]: keeps ``ceil(keep * M)`` of the M candidates."""

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = F.check_keep(keep)

    def keep_count(self, state: TokenState, ctx: ReduceContext) -> int:
        return F.keep_count(self.keep, state.num_tokens - 1)

    def extra_repr(self) -> str:
        return f"keep={self.keep}"


def rate_point(name: str, f: float, schedule: dict, vision) -> ReduceConfig:
    """The operating point of a keep-rate method that keeps about ``f`` of the image tokens: the same keep
    ``f ** (1 / n)`` at each of the schedule's n layers."""
    layers = tuple(schedule["layers"])
    return ReduceConfig(name, layers=layers, keep=round(f ** (1 / len(layers)), 4))
