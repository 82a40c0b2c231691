"""Qwen2-VL (``Qwen2VLForConditionalGeneration``: dynamic resolution, M-RoPE): the language-model methods
(FastV, TRIPS-LVLM, SparseVLM), with the machinery of ``lvlm.py``.

Why it works unchanged: the model computes the M-RoPE position ids (``get_rope_index``: text 1-D, image token
(t, i, j) at start + (t, i, j)) on the full prompt and its rotary embedding merges the three sections into one
(cos, sin) per token; the reducing layer gathers that (cos, sin) per sample, so a kept image token keeps its
(t, h, w) rotation and TRIPS-LVLM's fused token takes the last image token's (SparseVLM moves all three
sections by the number of tokens it removed before each token, see reduce/sparsevlm.py). The first layers cache the full
prompt, so generate's decode positions (cache length + ``rope_deltas``) stay the unpatched model's.
The vision-tower methods are refused with the reason (``WHY``): EViT and VisionZip rank by a [CLS] attention row
the tower does not have; ToMe, random and DynamicViT would break the 2 x 2 patch merger after the tower and the
(t, h, w) grid of the M-RoPE indices.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import Binding, Offer, Patch, register_family
from .lvlm import LLMSlot, install_llm, no_tower_guide

_USE = "; use fastv_llm, trips_llm or sparsevlm (in the language model)"
_GRID = ("Qwen2-VL's tower merges every 2 x 2 group of neighbouring patches after its last layer and places them "
         "by their (t, h, w) grid (M-RoPE), so patches cannot be dropped or merged inside it" + _USE)
WHY = {"evit": "it ranks patches by the [CLS] attention and Qwen2-VL's vision tower has no [CLS]" + _USE,
       "visionzip": "it needs the [CLS] attention, which Qwen2-VL's vision tower does not have" + _USE,
       "tome": _GRID, "random": _GRID, "dynamicvit": _GRID, "lowres": "it is not wired into Qwen2-VL" + _USE,
       "trips": no_tower_guide("Qwen2-VL"),
       "elip": "it needs a text encoder's guide" + _USE}
LLM_GUIDE = "the prompt guides the selection inside the language model"
CLASSES = {"Qwen2VLForConditionalGeneration": Offer({"llm": True}, guide=LLM_GUIDE, reasons=WHY)}


@register_family("qwen2_vl", CLASSES)
def bind(model: nn.Module) -> Optional[Binding]:
    return llm_only_bind(model, "qwen2_vl", CLASSES)


def llm_only_bind(model: nn.Module, family: str, classes: dict) -> Optional[Binding]:
    """The binding of a family whose methods all run in the language model (``model.model.language_model``)."""
    name = type(model).__name__
    if name not in classes:
        return None
    cfg = model.config
    slots = [LLMSlot(layer, i) for i, layer in enumerate(model.model.language_model.layers)]
    tc = cfg.text_config if hasattr(cfg, "text_config") else cfg
    vc = cfg.vision_config
    width = getattr(vc, "embed_dim", None) or vc.hidden_size

    def install(p: Patch) -> None:
        if p.spec.groups and p.spec.groups[0] == "llm":
            install_llm(p, model, slots, cfg.image_token_id)

    return Binding(family, "llm", slots, width, tc.hidden_size, 0, classes[name], install)


__all__ = ["bind", "llm_only_bind", "CLASSES"]
