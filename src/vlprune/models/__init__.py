"""Models with a reduction slot in every ViT / fusion / joint layer."""

from .albef import ALBEF, ModelOutput
from .attention import Attention, full_attention_map
from .build import attach, build_model, load_pretrained, read_config, save_pretrained
from .hf import from_hf
from .official import LoadReport, load_official, to_official
from .text import FusionEncoder, TextEncoder
from .vilt import ViLT, ViLTOutput
from .vit import VisionTransformer, interpolate_pos_embed

__all__ = [
    "ALBEF", "ModelOutput", "ViLT", "ViLTOutput", "Attention", "full_attention_map", "VisionTransformer",
    "TextEncoder", "FusionEncoder", "interpolate_pos_embed", "build_model", "attach", "save_pretrained",
    "load_pretrained", "read_config", "from_hf", "load_official", "to_official", "LoadReport",
]
