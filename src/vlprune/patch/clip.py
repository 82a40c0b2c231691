"""CLIP (``CLIPModel``, ``CLIPVisionModel``): the methods in the layers of the vision tower (slot group "vision").

Image-only methods need nothing else: ``model(...)``, ``get_image_features`` and ``CLIPVisionModel(...)`` reduce.
Text-guided methods (TRIPS, ELIP) need a guide the caller supplies, (B, D) in the vision width, through
``with vlprune.patch.guidance(model, guide): ...`` (e.g. to score each image against one caption); the image
embedding then depends on that text, so it is no longer a text-free feature to index.

The patched layers run SDPA on the layer's own q/k/v projections (CLIP's ``out_proj``), as transformers' SDPA
path does; the vision tower of CLIP takes no attention mask.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import Binding, Offer, Patch, register_family, vision_encoder_forward
from .layers import AttnView, LayerView

OFFER = Offer({"vision": True}, guide="CLIP's image features are text-free, so the caller supplies the guide",
              reasons={"tip": "it needs a cross-modal encoder, which CLIP has not", "laps": "it is not wired into CLIP"})
CLASSES = {"CLIPModel": OFFER, "CLIPVisionModel": OFFER}


def vision_parts(model: nn.Module):
    """(the vision transformer module holding ``encoder``, its config): transformers 5 puts the encoder on
    ``CLIPVisionModel`` itself and ``CLIPModel.vision_model`` is a CLIPVisionModel; 4.x has a CLIPVisionTransformer
    in between."""
    vm = model.vision_model if hasattr(model, "vision_model") else model
    if not hasattr(vm, "encoder") and hasattr(vm, "vision_model"):
        vm = vm.vision_model
    cfg = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
    return vm, cfg


@register_family("clip", CLASSES, bench=("evit", "tome"))
def bind(model: nn.Module) -> Optional[Binding]:
    name = type(model).__name__
    if name not in CLASSES:
        return None
    vm, vc = vision_parts(model)
    D, H = vc.hidden_size, vc.num_attention_heads
    views = []
    for layer in vm.encoder.layers:
        a = layer.self_attn
        attn = AttnView(H, D, a.q_proj, a.k_proj, a.v_proj, a.out_proj, float(getattr(vc, "attention_dropout", 0.0)),
                        owner=layer)
        views.append(LayerView(layer, layer.layer_norm1, attn, layer.layer_norm2, layer.mlp))

    def install(p: Patch) -> None:
        p.override(vm.encoder, "forward", vision_encoder_forward(p, vc, vm))

    return Binding("clip", "vision", views, D, D, (vc.image_size // vc.patch_size) ** 2, CLASSES[name], install)


__all__ = ["bind", "CLASSES"]
