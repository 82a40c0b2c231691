"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``: any-resolution tiles).

An image becomes one run of ``image_token_id`` placeholders: the base crop, then the unpadded tile grid with an
``image_newline`` after every row (``pack_image_features``).
- Language-model methods (FastV, TRIPS-LVLM, SparseVLM; ``lvlm.py``): the candidates are every placeholder of the
  run, newlines included (as PyramidDrop does); the sequence is as the model packs it.
- Vision-tower methods (EViT, ToMe, random in the CLIP layers up to the feature layer): every crop (the base and
  each tile) is reduced alone to the same k tokens, which no longer form a grid, so the patch packs an image as
  [base crop's k tokens, each tile's k tokens in the tile grid's raster order]: no unpadding, no newline tokens.
  The unused placeholders are removed from the prompt before the model runs (as for LLaVA-1.5). When the tower
  keeps every token (keep 1.0) the model's own packing runs: the unpatched model.
The number of tokens depends on the image size, so a batch needs images of the same size (the same number of image
tokens per row). VisionZip is not wired here (its per-crop token order is not implemented).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import clip
from .base import Binding, Offer, Patch, register_family
from .llava import ProjectorSlot, install_tower
from .lvlm import LLMSlot, install_llm, no_tower_guide
from .qwen2_vl import LLM_GUIDE

EXCLUDED = {"trips": no_tower_guide("LLaVA-NeXT"),
            "elip": "it needs the text encoder's guide; use trips_llm or sparsevlm",
            "dynamicvit": "it is not wired into LLaVA-NeXT", "lowres": "it is not wired into LLaVA-NeXT"}
WHY = {"visionzip": "its per-crop token order on LLaVA-NeXT's tiles is not implemented; use fastv_llm, sparsevlm or a "
                    "tower method (evit, tome, random)",
       "tip": "it needs a cross-modal encoder", "laps": "it is not wired into LLaVA-NeXT"}
CLASSES = {"LlavaNextForConditionalGeneration": Offer({"llm": True, "vision": True}, guide=LLM_GUIDE,
                                                      excluded=EXCLUDED, reasons=WHY)}


def crops_per_image(model: nn.Module, image_sizes: Tensor) -> int:
    """The number of crops (base + tiles) of each image of a batch; they must be equal."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    n = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in image_sizes]
    if len(set(n)) != 1:
        raise ValueError(f"a vision-tower method on {type(model).__name__} needs images of one size in a batch (the "
                         f"same number of crops), got {n} crops for image_sizes {image_sizes.tolist()}")
    return n[0]


def flat_pack(orig: Callable, per_crop: int) -> Callable:
    """Replacement of ``pack_image_features``: the model's own packing when every crop has its full grid, else each
    image's crops flattened in order (base, then the tiles)."""

    def pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=None, **kw):
        if image_features[0].shape[1] == per_crop:
            return orig(image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline, **kw)
        out = [f.flatten(0, 1) for f in image_features]
        return out, torch.tensor([len(f) for f in out], dtype=torch.long, device=out[0].device)

    return pack


@register_family("llava_next", CLASSES)
def bind(model: nn.Module) -> Optional[Binding]:
    name = type(model).__name__
    if name not in CLASSES:
        return None
    inner, cfg = model.model, model.config
    vb = clip.bind(inner.vision_tower)
    if vb is None:
        raise ValueError(f"vlprune.patch supports LLaVA-NeXT with a CLIP vision tower, got "
                         f"{type(inner.vision_tower).__name__}")
    slots = [LLMSlot(layer, i) for i, layer in enumerate(inner.language_model.layers)]
    full = vb.num_patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)

    def count(p: Patch, px: Tensor, kwargs: Dict[str, Any], tower: nn.Module) -> Tuple[Optional[int], Any]:
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError(f"{name} with a vision-tower method needs image_sizes (as its processor gives)")
        one = px[:1, :1].flatten(0, 1) if px.dim() == 5 else px[:1]
        tower(one)  # one crop: how many tokens each crop keeps
        k = p.last_tokens
        p.image_tokens = k * crops_per_image(model, sizes)  # per image, as the language model gets them
        return (None if k == full else p.image_tokens), None

    def install(p: Patch) -> None:
        group = p.spec.groups[0] if p.spec.groups else None
        if group == "llm":
            install_llm(p, model, slots, cfg.image_token_id)
        elif group == "vision":
            install_tower(p, model, vb, ProjectorSlot(), count)
            p.override(inner, "pack_image_features", flat_pack(inner.pack_image_features, full))

    return Binding("llava_next", "llm", slots, vb.vision_width, cfg.text_config.hidden_size, vb.num_patches,
                   CLASSES[name], install, more={"vision": vb.views})


__all__ = ["bind", "CLASSES", "crops_per_image", "flat_pack"]
