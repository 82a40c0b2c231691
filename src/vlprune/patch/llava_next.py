"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``: any-resolution tiles): the language-model methods (FastV,
TRIPS-LVLM) with the machinery of ``lvlm.py``.

An image becomes one run of ``image_token_id`` placeholders: the base crop, then the unpadded tile grid with an
``image_newline`` after every row (``pack_image_features``). The candidates are every placeholder of the run,
newlines included (as PyramidDrop does); the kept ones keep their original positions. The number of tokens
depends on the image size, so a batch needs images of the same size (the same number of image tokens per row).
The tower-side methods (VisionZip per crop, EViT, ToMe, random) are not wired into LLaVA-NeXT yet.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import Binding, register_family
from .qwen2_vl import llm_offer, llm_only_bind

WHY = {m: "the vision-tower methods are not wired into LLaVA-NeXT's tiles yet; use fastv_llm or trips_llm"
       for m in ("visionzip", "evit", "tome", "random", "trips", "elip")}
CLASSES = {"LlavaNextForConditionalGeneration": llm_offer(WHY)}


@register_family("llava_next", CLASSES)
def bind(model: nn.Module) -> Optional[Binding]:
    return llm_only_bind(model, "llava_next", CLASSES)


__all__ = ["bind", "CLASSES"]
