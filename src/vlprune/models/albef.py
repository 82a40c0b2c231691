"""ALBEF-style two-stream model: ViT image encoder, BERT text encoder, fusion encoder with cross-attention,
ITC projections, ITM and MLM heads, optional momentum copies and feature queues.

Data flow for one image-text pair: text -> text encoder -> ``t_cls`` (the guide) -> ViT layers,
each of which may reduce the image tokens -> fusion encoder (text cross-attends to the fewer image tokens) -> heads.
The momentum copies are never pruned (they are teachers); reducers live only in the main model's slots.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..reduce.state import LayerTrace, ReduceContext, TokenState
from .base import MLMHead, PairEncoding, ReductionSlots
from .text import FusionEncoder, TextEncoder
from .vit import ImageEmbeddings, VisionTransformer, _init_weights


@dataclass
class ModelOutput:
    """image: the image TokenState after the vision encoder (and after fusion-layer reductions in ``fused_image``);
    text: (B, L, D) text states; fused: (B, L, D) multimodal states; itm_logits: (B, 2) (match = index 1)."""

    image: TokenState
    text: Tensor
    fused: Tensor
    fused_image: TokenState
    itm_logits: Tensor


class ALBEF(nn.Module, ReductionSlots):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._init_model(cfg, "albef")
        t, v = cfg.text, cfg.vision
        self.vision = VisionTransformer(v)
        self.text = TextEncoder(t)
        self.fusion = FusionEncoder(t, cfg.fusion_layers, v.width)
        self.vision_proj = nn.Linear(v.width, cfg.embed_dim)
        self.text_proj = nn.Linear(t.width, cfg.embed_dim)
        self.itm_head = nn.Linear(t.width, 2)
        self.mlm_head = MLMHead(t.width, t.vocab_size, t.act, t.ln_eps, self.text.embeddings.word)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.mlm_head):
            m.apply(_init_weights)
        self.momentum_encoders: Optional[nn.ModuleDict] = None
        if cfg.use_momentum:
            self.momentum_encoders = nn.ModuleDict(
                {
                    "vision": copy.deepcopy(self.vision),
                    "vision_proj": copy.deepcopy(self.vision_proj),
                    "text": copy.deepcopy(self.text),
                    "text_proj": copy.deepcopy(self.text_proj),
                    "fusion": copy.deepcopy(self.fusion),
                }
            )
            for p in self.momentum_encoders.parameters():
                p.requires_grad_(False)
        if cfg.queue_size > 0:
            q = cfg.queue_size
            self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
            self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # -- slots -------------------------------------------------------------------------------------------------
    def reduction_slots(self) -> Dict[str, List[nn.Module]]:
        return {"vision": list(self.vision.layers), "fusion": list(self.fusion.layers)}

    # -- encoders ----------------------------------------------------------------------------------------------
    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (B, L) -> text states (B, L, D); ``[:, 0]`` is ``t_cls``, the guide of TRIPS and ELIP."""
        return self.text(ids, mask)

    def encode_image(
        self,
        images: Tensor,
        text: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        trace: bool = False,
        interpolate_pos: bool = False,
    ) -> TokenState:
        """Image tokens after the ViT. With ``text`` (B, L, D) given, its [CLS] guides text-guided methods;
        without text, a text-guided method raises (use an unguided pass for retrieval's first stage)."""
        ctx = self.context(text, text_mask, generator)
        if text is not None and text.shape[0] != images.shape[0]:
            raise ValueError(f"image batch ({images.shape[0]}) and text batch ({text.shape[0]}) differ in size")
        return self.vision(images, ctx, trace=trace, interpolate_pos=interpolate_pos)

    @staticmethod
    def context(text: Optional[Tensor], text_mask: Optional[Tensor], generator=None) -> ReduceContext:
        guide = None if text is None else text[:, 0]
        return ReduceContext(guide=guide, text=text, text_mask=text_mask, generator=generator)

    def fuse(self, text: Tensor, text_mask: Tensor, image: TokenState, generator=None):
        """Fusion encoder: (B, L, D) text states cross-attend to the image tokens -> (fused, image state)."""
        return self.fusion(text, text_mask, image, self.context(text, text_mask, generator))

    def image_embed(self, image: TokenState) -> Tensor:
        """L2-normalised ITC embedding of the image [CLS]: (B, embed_dim)."""
        return F.normalize(self.vision_proj(image.x[:, 0]), dim=-1)

    def text_embed(self, text: Tensor) -> Tensor:
        """L2-normalised ITC embedding of the text [CLS]: (B, embed_dim)."""
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def forward(
        self,
        images: Tensor,
        ids: Tensor,
        mask: Tensor,
        generator: Optional[torch.Generator] = None,
        trace: bool = False,
        interpolate_pos: bool = False,
    ) -> ModelOutput:
        """One text-guided pass over matched image-text pairs: text -> guided image tokens -> fusion -> ITM."""
        self._check_pairs(images, ids)
        text = self.encode_text(ids, mask)
        image = self.encode_image(images, text, mask, generator, trace, interpolate_pos)
        fused, fused_image = self.fuse(text, mask, image, generator)
        return ModelOutput(image, text, fused, fused_image, self.itm_head(fused[:, 0]))

    @staticmethod
    def trace_records(output: ModelOutput) -> List[Tuple[str, LayerTrace]]:
        """(slot group, LayerTrace) pairs of a traced forward pass (``trace=True``), in order."""
        vis = tuple(output.image.trace or ())
        fus = tuple(output.fused_image.trace or ())[len(vis):]
        return [("vision", r) for r in vis] + [("fusion", r) for r in fus]

    # -- the multimodal interface both model families share --------------------------------------------------
    def shared_text(self, ids: Tensor, mask: Tensor) -> Optional[Tensor]:
        """Text states that several images paired with the same caption can share: the text encoder's output."""
        return self.encode_text(ids, mask)

    def encode_pair(self, images: Tensor, ids: Tensor, mask: Tensor, generator: Optional[torch.Generator] = None,
                    text: Optional[Tensor] = None) -> PairEncoding:
        """Text-guided pairs (``text``: ``shared_text(ids, mask)`` when already computed)."""
        text = self.encode_text(ids, mask) if text is None else text
        image = self.encode_image(images, text, mask, generator)
        fused, fused_image = self.fuse(text, mask, image, generator)
        return PairEncoding(fused[:, 0], fused_image, image.x)

    def image_pass(self, images: Tensor, ids: Tensor, mask: Tensor, text: Optional[Tensor] = None) -> TokenState:
        """The image side of a text-guided pass, what an image's cost is counted on: the ViT guided by ``text``."""
        return self.encode_image(images, self.encode_text(ids, mask) if text is None else text, mask)

    def patch_embeddings(self) -> ImageEmbeddings:
        """The main image encoder's input embedding (the momentum teacher's is not included)."""
        return self.vision.embeddings

    def cross_modal_modules(self) -> List[nn.Module]:
        """The modules where image and text meet (trained in TiP's stage 2): the fusion encoder."""
        return [self.fusion]

    # -- momentum ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA of the online encoders into the momentum copies (ALBEF), ``m = cfg.momentum``."""
        if self.momentum_encoders is None:
            return
        m = self.cfg.momentum
        for name, tgt in self.momentum_encoders.items():
            src = dict(getattr(self, name).named_parameters())  # by name: reducers' own parameters are skipped
            for key, pt in tgt.named_parameters():
                pt.mul_(m).add_(src[key].detach(), alpha=1.0 - m)

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Reset the momentum copies to the online weights (after loading pre-trained weights)."""
        if self.momentum_encoders is None:
            return
        for name, tgt in self.momentum_encoders.items():
            src = dict(getattr(self, name).named_parameters())
            for key, pt in tgt.named_parameters():
                pt.copy_(src[key])
