"""ViLT-style single-stream model: one pre-norm transformer over [text tokens; image tokens].

Each joint layer: ``x = x + attn(ln1(x))`` over the concatenation (text padding masked), then the reduction slot
reduces the *image* part (the guide is the layer's multimodal [CLS], i.e. the text [CLS] row of the joint
sequence, as TRIPS-S and TiP use it), then ``x = x + mlp(ln2(x))``. A reducer with ``where = "post"`` runs after
the MLP instead, on the layer's output (TiP's ``placement="post_mlp"``, PuMer's place); it gets no query or key rows.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..reduce.slots import SlotInput
from ..reduce.state import LayerTrace, ReduceContext, TokenState, policy_bias
from .base import MLMHead, PairEncoding, ReductionSlots, run_block
from .attention import Attention, Mlp
from .text import TextEmbeddings, check_text
from .vit import ImageEmbeddings, _init_weights


@dataclasses.dataclass
class ViLTOutput:
    text: Tensor  # (B, L, D) final text states
    image: TokenState  # final image tokens (after reductions)
    pooled: Tensor  # (B, D) tanh(W [CLS])
    itm_logits: Tensor  # (B, 2)


def joint_bias(text_mask: Tensor, image: TokenState, dtype: torch.dtype) -> Tensor:
    """Additive mask over the joint keys [text; image]: text padding, log(size) for proportional attention and,
    on masked training paths, masked image keys (every token still attends to itself)."""
    B, L = text_mask.shape
    T = image.num_tokens
    neg = torch.finfo(dtype).min
    text_part = torch.zeros(B, L, dtype=dtype, device=text_mask.device).masked_fill(text_mask == 0, neg)
    img_part = image.size.log().to(dtype) if image.prop_attn else torch.zeros(B, T, dtype=dtype, device=text_mask.device)
    bias = torch.cat([text_part, img_part], dim=1)[:, None, None, :]
    if image.mask is None:
        return bias
    if image.mask.requires_grad:  # differentiable straight-through policy (state.POLICY_FLOOR)
        p = torch.cat([torch.ones(B, L, dtype=image.mask.dtype, device=text_mask.device), image.mask], dim=1)
        p = p[:, None, None, :]
        eye = torch.eye(L + T, dtype=p.dtype, device=p.device)
        return (bias + policy_bias(p + (1 - p) * eye, dtype)).clamp_min(neg)
    keep = torch.cat([torch.ones(B, L, dtype=torch.bool, device=text_mask.device), image.mask > 0], dim=1)
    allowed = keep[:, None, None, :] | torch.eye(L + T, dtype=torch.bool, device=text_mask.device)
    return (bias + torch.zeros(allowed.shape, dtype=dtype, device=bias.device).masked_fill(~allowed, neg)).clamp_min(neg)


class JointLayer(nn.Module):
    grad_checkpointing = False  # models.base.set_grad_checkpointing

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, act, dropout)
        self.reducer: Optional[nn.Module] = None

    def forward(
        self, text: Tensor, text_mask: Tensor, image: TokenState, ctx: ReduceContext
    ) -> Tuple[Tensor, TokenState]:
        L = text.shape[1]
        x = torch.cat([text, image.x], dim=1)
        a, q, k = self.attn(self.ln1(x), bias=joint_bias(text_mask, image, x.dtype))
        x = x + a
        text, image = x[:, :L], image.replace(x=x[:, L:])
        r = self.reducer
        if r is not None and r.where != "post":
            ctx = dataclasses.replace(ctx, guide=text[:, 0], text=text, text_mask=text_mask)
            slot = SlotInput.pre_norm("joint", self, q[:, :, L:], k[:, :, L:], q[:, :, :L], text_mask)
            image = r(image, slot, ctx)
        x = torch.cat([text, image.x], dim=1)
        x = x + self.mlp(self.ln2(x))
        text, image = x[:, :L], image.replace(x=x[:, L:])
        if r is not None and r.where == "post":  # on the layer's output (TiP placement="post_mlp", as PuMer)
            ctx = dataclasses.replace(ctx, guide=text[:, 0], text=text, text_mask=text_mask)
            image = r(image, SlotInput.pre_norm("joint", self, text_mask=text_mask), ctx)
        return text, image


class ViLT(nn.Module, ReductionSlots):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._init_model(cfg, "vilt")
        v, t = cfg.vision, cfg.text
        D = v.width
        self.text_embeddings = TextEmbeddings(t)
        self.image_embeddings = ImageEmbeddings(v)
        self.modality = nn.Embedding(2, D)  # 0 = text, 1 = image
        self.layers = nn.ModuleList(JointLayer(D, v.heads, v.mlp_dim, v.act, v.ln_eps, t.dropout) for _ in range(v.layers))
        self.norm = nn.LayerNorm(D, eps=v.ln_eps)
        self.pooler = nn.Linear(D, D)
        self.itm_head = nn.Linear(D, 2)
        self.mlm_head = MLMHead(D, t.vocab_size, t.act, t.ln_eps, self.text_embeddings.word)
        for m in (self.image_embeddings.patch_embed, self.text_embeddings, self.modality, self.layers, self.norm, self.pooler, self.itm_head, self.mlm_head):
            m.apply(_init_weights)

    def reduction_slots(self) -> Dict[str, List[nn.Module]]:
        return {"joint": list(self.layers)}

    # -- the multimodal interface both model families share (see ALBEF) ----------------------------------------
    def shared_text(self, ids: Tensor, mask: Tensor) -> Optional[Tensor]:
        """None: in a single-stream model the text is encoded together with each image."""
        return None

    def encode_pair(self, images: Tensor, ids: Tensor, mask: Tensor, generator: Optional[torch.Generator] = None,
                    text: Optional[Tensor] = None) -> PairEncoding:
        out = self(images, ids, mask, generator=generator)
        return PairEncoding(out.pooled, out.image, out.image.x)

    def image_pass(self, images: Tensor, ids: Tensor, mask: Tensor, text: Optional[Tensor] = None) -> ViLTOutput:
        """The image side of a text-guided pass: here the whole joint encoder (text and image are not separable)."""
        return self(images, ids, mask)

    def patch_embeddings(self) -> ImageEmbeddings:
        return self.image_embeddings

    def cross_modal_modules(self) -> List[nn.Module]:
        """The modules where image and text meet (trained in TiP's stage 2): the joint layers, norm and pooler."""
        return [self.layers, self.norm, self.pooler]

    @staticmethod
    def trace_records(output: ViLTOutput) -> List[Tuple[str, LayerTrace]]:
        """(slot group, LayerTrace) pairs of a traced forward pass (``trace=True``), in order."""
        return [("joint", r) for r in (output.image.trace or ())]

    def forward(
        self,
        images: Tensor,
        ids: Tensor,
        mask: Tensor,
        generator: Optional[torch.Generator] = None,
        trace: bool = False,
        interpolate_pos: bool = False,
    ) -> ViLTOutput:
        check_text(ids, mask, self.cfg.text)
        self._check_pairs(images, ids)
        text = self.text_embeddings(ids) + self.modality.weight[0]
        img = self.image_embeddings(images, interpolate_pos) + self.modality.weight[1]
        image = TokenState.start(img, trace=trace)
        ctx = ReduceContext(generator=generator, num_patches=image.num_tokens - 1)
        for i, layer in enumerate(self.layers):
            text, image = run_block(layer, text, mask, image, ctx.at(i, self))
        text = self.norm(text)
        image = image.replace(x=self.norm(image.x))
        pooled = torch.tanh(self.pooler(text[:, 0]))
        return ViLTOutput(text, image, pooled, self.itm_head(pooled))
