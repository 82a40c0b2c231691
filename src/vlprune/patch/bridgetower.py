"""BridgeTower (``BridgeTowerForImageAndTextRetrieval``, ``BridgeTowerForMaskedLM``, ``BridgeTowerModel``): TiP in the
cross-modal image layers, the METER-style co-attention stream where TiP was evaluated (slot group "fusion").

A TiP pruner sits after cross-modal image layer l (1-based, of ``config.num_hidden_layers``) and keeps the top
``ceil(keep * M)`` image tokens by its keep probability, physically; every later cross-modal layer (image
self-attention, and the text stream's cross-attention to the image) then sees fewer image tokens. BridgeTower adds a
bridge before each later cross-modal layer: the uni-modal vision layer's tokens (all of them) enter the image stream
through a link tower (``LayerNorm(uni + cross)``). The patch feeds the bridge, for each surviving token, the mean of
the uni-modal tokens it covers (its provenance): for a kept token exactly that token. The layers themselves are
transformers' own and run unchanged (their attention implementation included); only the model's ``forward``, the
reducing cross-modal image layers and the image link towers are wrapped, per instance.

Training (``model.train()``): TiP's masked path, as in vlprune's own models: tokens stay, the hard
straight-through mask removes pruned tokens from the later image self-attention (a token attends to itself) and from
the text stream's cross-attention; the contrastive term's text is the cross-modal text stream entering the layer.
The AuxRecords for TiP's losses are ``get_patch(model).last_aux`` after each call.

Limitations: methods that score with the attention (TRIPS, EViT, ToMe) are not offered here, because the HF
cross-modal layers do not expose their queries and keys.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from ..reduce.slots import SlotInput
from ..reduce.state import ReduceContext, TokenState
from .core import Binding, Patch
from .vilt import key_mask

METHODS = ("none", "tip")
CLASSES = {"BridgeTowerForImageAndTextRetrieval": METHODS, "BridgeTowerForMaskedLM": METHODS,
           "BridgeTowerModel": METHODS}


class CrossLayerSlot:
    """The reduction slot after one cross-modal image layer (what the method builders fill)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.reducer: Optional[nn.Module] = None


def _no_query(h: Tensor) -> Tensor:
    raise ValueError("BridgeTower's cross-modal layers do not expose their query projection to vlprune.patch")


def reducing_layer(p: Patch, slot: CrossLayerSlot, index: int, num_patches: int) -> Callable:
    """The cross-modal image layer's forward, then its reducer on the image tokens it outputs."""
    inner = slot.layer.forward

    def forward(*args: Any, **kwargs: Any):
        out = inner(*args, **kwargs)
        run = p.call_info().get("bridge")
        if run is None:
            raise ValueError("the patched BridgeTower layers run inside the model's forward; call the model")
        x = out[0] if isinstance(out, tuple) else out
        p.sync(x, slot.layer.training)
        state = run.get("state") or TokenState.start(x, trace=True)
        text = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        tmask = key_mask(kwargs.get("encoder_attention_mask"), text.shape[0], text.shape[1], text.device)
        ctx = ReduceContext(text=text, text_mask=tmask, generator=p.generator, layer=index, num_patches=num_patches)
        state = slot.reducer(state.replace(x=x), SlotInput("fusion", slot, None, None, _no_query), ctx)
        run["state"] = state
        p.last_tokens, p.last_aux = state.num_tokens, state.aux
        return (state.x,) + tuple(out[1:]) if isinstance(out, tuple) else state.x

    return forward


def fitted_masks(p: Patch, layer: nn.Module, name: str, image_self: bool) -> Callable:
    """A cross-modal layer's forward with its image mask keyword ``name`` set from the image tokens now present:
    the image layers' self-attention bias (``TokenState.attn_bias``: a training mask, a token always attending to
    itself) or the text layers' cross-attention bias (``cross_attention_bias``); None when nothing is masked.
    transformers 4.x passes an all-zero image mask for the full token count (checked, then replaced); 5.x none."""
    inner = layer.forward

    def forward(*args: Any, **kwargs: Any):
        state = (p.call_info().get("bridge") or {}).get("state")
        if state is not None:
            m = kwargs.get(name)
            if m is not None and (bool((m != 0).any()) if m.is_floating_point() else not bool(m.all())):
                raise ValueError("BridgeTower image padding (pixel_mask with zeros) is not supported by vlprune.patch: "
                                 "resize the images of a batch to one size")
            dtype = args[0].dtype
            kwargs[name] = state.attn_bias(dtype) if image_self else state.cross_attention_bias(dtype)
        return inner(*args, **kwargs)

    return forward


def bridged_link_tower(p: Patch, tower: nn.Module) -> Callable:
    """The image link tower, fed for each surviving token the mean of the uni-modal tokens it covers."""
    inner = tower.forward

    def forward(hidden_states: Tensor, cross_modal_hidden_states: Tensor, attention_mask: Any = None):
        state = (p.call_info().get("bridge") or {}).get("state")
        if state is not None and hidden_states.shape[1] != cross_modal_hidden_states.shape[1]:
            src = state.source.to(hidden_states.dtype)  # (B, T, 1 + N) provenance over the uni-modal tokens
            hidden_states = (src @ hidden_states) / src.sum(-1, keepdim=True)
        return inner(hidden_states, cross_modal_hidden_states, attention_mask)

    return forward


def bind(model: nn.Module) -> Optional[Binding]:
    name = type(model).__name__
    if name not in CLASSES:
        return None
    bt = model if name == "BridgeTowerModel" else model.bridgetower
    cfg, vc = bt.config, bt.config.vision_config
    slots = [CrossLayerSlot(layer) for layer in bt.cross_modal_image_layers]
    n = (vc.image_size // vc.patch_size) ** 2
    towers = bt.cross_modal_image_link_tower
    towers = list(towers) if isinstance(towers, nn.ModuleList) else [towers]
    why = {m: "BridgeTower's cross-modal layers run as transformers has them and do not expose their attention, "
              "so only TiP's pruner (which needs no attention scores) is wired in" for m in
           ("trips", "elip", "evit", "tome", "dynamicvit", "random", "laps", "lowres")}

    def install(p: Patch) -> None:
        inner = bt.forward

        def bt_forward(*args: Any, **kwargs: Any):
            p.last_tokens = None
            with p.guided(None, bridge={}):
                return inner(*args, **kwargs)

        p.override(bt, "forward", bt_forward)
        for layer in bt.cross_modal_text_layers:
            p.override(layer, "forward", fitted_masks(p, layer, "encoder_attention_mask", False))
        for layer in bt.cross_modal_image_layers:
            p.override(layer, "forward", fitted_masks(p, layer, "attention_mask", True))
        for i, slot in enumerate(slots):
            if slot.reducer is not None:
                p.override(slot.layer, "forward", reducing_layer(p, slot, i, n))
        for t in towers:
            p.override(t, "forward", bridged_link_tower(p, t))

    return Binding("bridgetower", "fusion", slots, cfg.hidden_size, cfg.hidden_size, n, CLASSES[name], install, why)


__all__ = ["bind", "CLASSES"]
