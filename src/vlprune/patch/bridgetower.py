"""BridgeTower (``BridgeTowerForImageAndTextRetrieval``, ``BridgeTowerForMaskedLM``, ``BridgeTowerModel``): TiP in the
cross-modal image layers, the METER-style co-attention stream where TiP was evaluated (slot group "fusion"); ELIP,
TRIPS, EViT, ToMe and random in the uni-modal vision layers (slot group "vision").

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

ELIP (slot group "vision") prunes the uni-modal vision stream, its place in a METER-style model: the CLIP-ViT layers
run through vlprune's own layer code on views of their weights (SDPA), so every bridge reads the pruned tokens. The
guide is the model's own uni-modal text encoder output [CLS] for the call's ``input_ids`` (the analogue of ALBEF's
text-encoder [CLS] and of BLIP's patch): that encoder reads no image, so the patch runs all of its layers when
the first one is called (transformers interleaves them with the vision layers) and hands each later call its
cached output; nothing is computed twice. The text width must equal the vision width (768 in bridgetower-base).
Where the vision stream shrinks after the cross-modal image stream started (a block past the split), the image link
tower gathers the cross-modal stream to match: a kept token its own cross-modal token, ELIP's fused token the mean
of the cross-modal tokens it covers, weighted by the original patches each covers. TRIPS (same guide), EViT, ToMe
and random run in the same vision layers the same way (ToMe's merged tokens gather like fused ones). These methods
prune physically in training too (no masked path), so their training signal is what the vision layers give.

Limitations: TRIPS, EViT, ToMe in the cross-modal layers are not offered, because the HF cross-modal layers do not
expose their queries and keys.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from ..reduce.slots import SlotInput
from ..reduce.state import ReduceContext, TokenState
from .base import Binding, Offer, Patch, register_family
from .layers import AttnView, EncoderView, LayerView, fused_qkv
from .vilt import key_mask

# the cross-modal image layers ("fusion") do not expose their queries and keys; the uni-modal vision layers do
OFFER = Offer({"fusion": False, "vision": True},
              guide="the guide is the model's uni-modal text encoder [CLS] of the call's input_ids",
              excluded={"dynamicvit": "its training path keeps pruned tokens under a mask, which BridgeTower's bridges "
                                      "and cross-modal layers would have to carry; not wired in"},
              reasons={m: "it is not wired into BridgeTower" for m in ("laps", "lowres")})
CLASSES = {"BridgeTowerForImageAndTextRetrieval": OFFER, "BridgeTowerForMaskedLM": OFFER, "BridgeTowerModel": OFFER}


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
        run = p.call_info().get("bridge") or {}
        state = run.get("state")
        if state is not None or run.get("vision") is not None:
            m = kwargs.get(name)
            if m is not None and (bool((m != 0).any()) if m.is_floating_point() else not bool(m.all())):
                raise ValueError("BridgeTower image padding (pixel_mask with zeros) is not supported by vlprune.patch: "
                                 "resize the images of a batch to one size")
            dtype = args[0].dtype
            if state is None:  # ELIP: the tokens are physically pruned, nothing is masked
                kwargs[name] = None
            else:
                kwargs[name] = state.attn_bias(dtype) if image_self else state.cross_attention_bias(dtype)
        return inner(*args, **kwargs)

    return forward


def gather_cross(now: Tensor, before: Tensor, cross: Tensor) -> Tensor:
    """The cross-modal image tokens (B, Tc, D), made from the uni-modal tokens with provenance ``before`` (B, Tc, 1 + N),
    matched to the uni-modal tokens now (provenance ``now``, (B, T, 1 + N)): each token the mean of the cross-modal
    tokens it covers, weighted by the original patches shared (a kept token: its own). Unchanged when equal."""
    if now.shape == before.shape and bool(torch.equal(now, before)):
        return cross
    w = now.to(cross.dtype) @ before.to(cross.dtype).transpose(1, 2)  # (B, T, Tc) patches shared
    return (w @ cross) / w.sum(-1, keepdim=True)


def vision_views(visual: nn.Module) -> List[LayerView]:
    """The uni-modal CLIP-ViT layers (``nn.MultiheadAttention``, fused in-projection laid out q, k, v) as LayerViews."""
    views = []
    for block in visual.transformer.resblocks:
        a = block.attn
        D = a.embed_dim
        q, k, v = fused_qkv(SimpleLinear(a.in_proj_weight, a.in_proj_bias), D)
        attn = AttnView(a.num_heads, D, q, k, v, a.out_proj, float(a.dropout), owner=block)
        mlp = nn.Sequential(*block.mlp.values())
        views.append(LayerView(block, block.ln_1, attn, block.ln_2, mlp))
    return views


class SimpleLinear:
    """What ``fused_qkv`` reads of a linear map: its weight and bias (here the attention's fused in-projection)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        self.weight, self.bias = weight, bias


def text_run_ahead(p: Patch, layers: List[nn.Module], index: int) -> Callable:
    """Uni-modal text layer ``index``'s forward for ELIP: the first layer's call runs every layer (the stream reads
    no image) and sets the guide, the output [CLS] of the last; later calls return the cached outputs."""
    inners = [layer.forward for layer in layers]

    def hidden(out: Any) -> Tensor:
        return out[0] if isinstance(out, tuple) else out

    def forward(*args: Any, **kwargs: Any):
        run = p.call_info().get("bridge")
        if run is None:
            return inners[index](*args, **kwargs)
        if index == 0:
            outs, h = [], args[0]
            for f in inners:
                outs.append(f(h, *args[1:], **kwargs))
                h = hidden(outs[-1])
            run["text_outs"], run["guide"] = outs, h[:, 0]
        outs = run.get("text_outs")
        prev = args[0] if index == 0 else (hidden(outs[index - 1]) if outs else None)
        if outs is None or args[0] is not prev:
            return inners[index](*args, **kwargs)  # not the run this cache was made for
        return outs[index]

    return forward


def vision_block(p: Patch, encoder: EncoderView, index: int, split: int, num_patches: int) -> Callable:
    """Uni-modal vision layer ``index``'s forward (tokens (T, B, D), sequence first as transformers has them) through
    its LayerView with the method's slot; after the last layer before the split, the cross-modal stream's provenance."""
    view = encoder.layers[index]

    def forward(hidden_state: Tensor, attention_mask: Optional[Tensor] = None):
        run = p.call_info().get("bridge")
        if run is None:
            raise ValueError("the patched BridgeTower vision layers run inside the model's forward; call the model")
        if attention_mask is not None and not bool((attention_mask == 0).all()):
            raise ValueError("BridgeTower image padding (pixel_mask with zeros) is not supported by vlprune.patch: "
                             "resize the images of a batch to one size")
        x = hidden_state.permute(1, 0, 2)
        p.sync(x, view.layer.training)
        state = run.get("vision")
        state = TokenState.start(x, trace=True) if state is None else state.replace(x=x)
        if p.spec.text_guided and run.get("guide") is None:
            raise ValueError(f"{p.config.name} on BridgeTower takes its guide from the model's text encoder: "
                             "pass input_ids")
        ctx = ReduceContext(guide=run.get("guide"), generator=p.generator, num_patches=num_patches)
        state = view.vision(state, ctx.at(index, encoder))
        run["vision"] = state
        if index == split - 1:
            run["cross_source"], run["split_tokens"] = state.source, state.num_tokens
        p.last_tokens, p.last_aux = state.num_tokens, state.aux
        return state.x.permute(1, 0, 2)

    return forward


def padded_image_transform(p: Patch, transform: nn.Module) -> Callable:
    """The forward of the linear map from the vision width to the cross-modal one, for the vision-tower methods:
    transformers adds the image token-type embeddings, expanded to the token count at the split, to its output;
    past a later pruning the output is padded with zero rows to that count (the image link tower cuts them off
    again, before anything reads them)."""
    inner = transform.forward

    def forward(hidden_states: Tensor) -> Tensor:
        out = inner(hidden_states)
        run = p.call_info().get("bridge") or {}
        T0 = run.get("split_tokens")
        if T0 is not None and out.shape[1] < T0:
            pad = out.new_zeros(out.shape[0], T0 - out.shape[1], out.shape[2])
            out = torch.cat([out, pad], dim=1)
        return out

    return forward


def bridged_link_tower(p: Patch, tower: nn.Module) -> Callable:
    """The image link tower, fed for each surviving token the mean of the uni-modal tokens it covers."""
    inner = tower.forward

    def forward(hidden_states: Tensor, cross_modal_hidden_states: Tensor, attention_mask: Any = None):
        run = p.call_info().get("bridge") or {}
        state, vision = run.get("state"), run.get("vision")
        if state is not None and hidden_states.shape[1] != cross_modal_hidden_states.shape[1]:
            src = state.source.to(hidden_states.dtype)  # (B, T, 1 + N) provenance over the uni-modal tokens
            hidden_states = (src @ hidden_states) / src.sum(-1, keepdim=True)
        if vision is not None:  # ELIP: the cross-modal stream follows the pruned uni-modal one
            hidden_states = hidden_states[:, : vision.num_tokens]  # the rows padded by padded_image_transform
            cross_modal_hidden_states = gather_cross(vision.source, run["cross_source"], cross_modal_hidden_states)
            run["cross_source"] = vision.source
        return inner(hidden_states, cross_modal_hidden_states, attention_mask)

    return forward


@register_family("bridgetower", CLASSES, bench=("tip",))
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
    visual = bt.vision_model.visual
    views = vision_views(visual)
    encoder = EncoderView(views)
    text_layers = list(bt.text_model.encoder.layer)
    split = len(text_layers) - cfg.num_hidden_layers + 1
    tw = cfg.text_config.hidden_size

    def install(p: Patch) -> None:
        inner = bt.forward
        in_vision = any(v.reducer is not None for v in views)
        if in_vision and p.spec.text_guided and tw != vc.hidden_size:
            raise ValueError(f"{p.config.name} on BridgeTower guides the image [CLS] with the text [CLS]: the text width "
                             f"{tw} must equal the vision width {vc.hidden_size}")

        def bt_forward(*args: Any, **kwargs: Any):
            p.last_tokens = None
            with p.guided(None, bridge={}):
                return inner(*args, **kwargs)

        p.override(bt, "forward", bt_forward)
        if in_vision:
            tr = bt.cross_modal_image_transform  # one Linear (4.x, shared) or one per layer (5.x)
            for t in (tr if isinstance(tr, nn.ModuleList) else [tr]):
                p.override(t, "forward", padded_image_transform(p, t))
            if p.spec.text_guided:
                for i, layer in enumerate(text_layers):
                    p.override(layer, "forward", text_run_ahead(p, text_layers, i))
            for i, view in enumerate(views):
                p.override(view.layer, "forward", vision_block(p, encoder, i, split, n))
        for layer in bt.cross_modal_text_layers:
            p.override(layer, "forward", fitted_masks(p, layer, "encoder_attention_mask", False))
        for layer in bt.cross_modal_image_layers:
            p.override(layer, "forward", fitted_masks(p, layer, "attention_mask", True))
        for i, slot in enumerate(slots):
            if slot.reducer is not None:
                p.override(slot.layer, "forward", reducing_layer(p, slot, i, n))
        for t in towers:
            p.override(t, "forward", bridged_link_tower(p, t))

    # the widths TiP's builder reads are the cross-modal ones; ELIP reads none (its width check is in install)
    return Binding("bridgetower", "fusion", slots, cfg.hidden_size, cfg.hidden_size, n, CLASSES[name], install,
                   more={"vision": views})


__all__ = ["bind", "CLASSES"]
