"""BLIP (``BlipForImageTextRetrieval``, ``BlipForQuestionAnswering``, ``BlipForConditionalGeneration``): the methods
in the layers of the vision tower (slot group "vision").

Text-guided methods (TRIPS, ELIP) take the guide as TRIPS does in ALBEF: the final [CLS] of the model's own text
encoder run first, unimodally (no cross-attention to the image), on the call's ``input_ids`` / ``attention_mask``
(the caption for ITM, the question for VQA). That pass is extra work the unpatched model does not do in ITM and VQA;
the benchmark counts it. ``BlipForImageTextRetrieval(..., use_itm_head=False)`` (ITC) runs the vision tower without
a text-guided method, so that image features stay caption-free (the first stage of two-stage retrieval);
image-only methods reduce there too. Captioning has no text before the image, so only image-only methods.

BLIP's vision attention is eager in transformers; the patched layers run SDPA and a method's score row is one row
computed from the layer's own query and keys.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor, nn

from .base import Binding, Offer, Patch, register_family, text_guided_call, vision_encoder_forward
from .layers import AttnView, LayerView, fused_qkv

_FUSION = {m: "it is not wired into BLIP's fusion layers" for m in ("tip", "laps")}
_GUIDED = Offer({"vision": True}, guide="call the model with input_ids (the guide is its text encoder's [CLS])",
                reasons=_FUSION)
CLASSES = {
    "BlipForImageTextRetrieval": _GUIDED,
    "BlipForQuestionAnswering": _GUIDED,
    "BlipForConditionalGeneration": Offer({"vision": True}, no_guide="captioning has no text before the image",
                                          reasons=_FUSION),
}


def vision_views(vision_model: nn.Module) -> list:
    """LayerViews of a BlipVisionModel's encoder layers (fused qkv laid out (3, H, d), ``projection`` out)."""
    cfg = vision_model.config
    D, H = cfg.hidden_size, cfg.num_attention_heads
    views = []
    for layer in vision_model.encoder.layers:
        a = layer.self_attn
        q, k, v = fused_qkv(a.qkv, D)
        attn = AttnView(H, D, q, k, v, a.projection, float(getattr(cfg, "attention_dropout", 0.0)), owner=layer)
        views.append(LayerView(layer, layer.layer_norm1, attn, layer.layer_norm2, layer.mlp))
    return views


def text_cls(text_encoder: nn.Module, args: Dict[str, Any]) -> Tensor:
    """The unimodal text encoder's final [CLS] (B, D) of the call's input_ids / attention_mask."""
    ids = args.get("input_ids")
    if ids is None:
        raise ValueError("a text-guided method on BLIP takes its guide from the caption: pass input_ids")
    mask = args.get("attention_mask")
    out = text_encoder(input_ids=ids, attention_mask=mask, return_dict=True)
    return out.last_hidden_state[:, 0]


@register_family("blip", CLASSES, bench=("trips", "evit", "tome"))
def bind(model: nn.Module) -> Optional[Binding]:
    name = type(model).__name__
    if name not in CLASSES:
        return None
    vm = model.vision_model
    vc = model.config.vision_config
    text_encoder = getattr(model, "text_encoder", None)
    tw = model.config.text_config.hidden_size if text_encoder is not None else vc.hidden_size

    def install(p: Patch) -> None:
        p.override(vm.encoder, "forward", vision_encoder_forward(p, vc, vm))
        if text_encoder is None:
            return
        guide = lambda a: text_cls(text_encoder, a)  # noqa: E731
        itc = (lambda a: a.get("use_itm_head", True) is False) if name == "BlipForImageTextRetrieval" else None
        p.override(model, "forward", text_guided_call(p, model.forward, guide, itc))
        if hasattr(model, "generate") and name == "BlipForQuestionAnswering":
            p.override(model, "generate", text_guided_call(p, model.generate, guide))

    return Binding("blip", "vision", vision_views(vm), vc.hidden_size, tw,
                   (vc.image_size // vc.patch_size) ** 2, CLASSES[name], install)


__all__ = ["bind", "CLASSES", "vision_views"]
