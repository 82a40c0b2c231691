"""ViLT (``ViltForQuestionAnswering``, ``ViltForImageAndTextRetrieval``, ``ViltForMaskedLM``): the methods in the
joint layers over [text; image] (slot group "joint"), as in vlprune's own ViLT-style model.

TRIPS-S takes as guide the layer's multimodal [CLS] (the text [CLS] row of the joint sequence after the layer's
attention); TiP's pruner scores the image tokens after the attention; EViT and ToMe work on the image part alone.
Text padding masks the joint attention as in the unpatched model. The text length comes from the call of the inner
``ViltModel`` (its ``input_ids`` / ``inputs_embeds``), whose ``forward`` the patch wraps for that.

Limitation: image padding (a ``pixel_mask`` with zeros, from images of different sizes in one batch) is not
supported by the reducers and raises; resize the batch to one size (e.g. 384 x 384).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..reduce.state import ReduceContext
from .base import Binding, Offer, Patch, register_family
from .layers import AttnView, LayerView

_SINGLE = "ViLT is single-stream: its image tokens are reduced in the joint layers"
OFFER = Offer({"joint": True}, guide="the guide is the joint layer's multimodal [CLS]",
              excluded={"random": "it is not wired into ViLT's joint layers"},
              reasons={m: _SINGLE for m in ("elip", "dynamicvit", "laps", "lowres")})
CLASSES = {"ViltForQuestionAnswering": OFFER, "ViltForImageAndTextRetrieval": OFFER, "ViltForMaskedLM": OFFER,
           "ViltModel": OFFER}


def views_of(encoder: nn.Module, cfg: Any) -> list:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    out = []
    for layer in encoder.layer:
        sa, so = layer.attention.attention, layer.attention.output

        def proj(o: Tensor, so=so) -> Tensor:
            return so.dropout(so.dense(o))

        def mlp(h: Tensor, layer=layer) -> Tensor:
            return layer.output.dropout(layer.output.dense(layer.intermediate(h)))

        attn = AttnView(H, D, sa.query, sa.key, sa.value, proj, float(cfg.attention_probs_dropout_prob), owner=layer)
        out.append(LayerView(layer, layer.layernorm_before, attn, layer.layernorm_after, mlp))
    return out


def key_mask(attention_mask: Optional[Tensor], B: int, K: int, device: torch.device) -> Tensor:
    """The 0/1 key mask (B, K) of the mask transformers hands the encoder: None (no padding), a bool mask
    (True = attend) or an additive float mask (0 = attend), of shape (B, 1, Q or 1, K) or (B, K)."""
    if attention_mask is None:
        return torch.ones(B, K, device=device)
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, 0]
    elif m.dim() == 3:
        m = m[:, 0]
    if m.dtype == torch.bool:
        return m.float()
    if m.is_floating_point():
        return (m > torch.finfo(m.dtype).min / 2).float()
    return (m != 0).float()


def encoder_forward(p: Patch, cfg: Any, encoder: nn.Module):
    from transformers.modeling_outputs import BaseModelOutput

    def forward(hidden_states: Tensor, attention_mask: Optional[Tensor] = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool = True, **kwargs: Any):
        p.check_outputs(cfg, {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states})
        L = p.call_info().get("text_len")
        if L is None:
            raise ValueError("the patched ViLT encoder runs inside its ViltModel's forward (the text length comes "
                             "from there); call the model, not its encoder")
        B, K, _ = hidden_states.shape
        keep = key_mask(attention_mask, B, K, hidden_states.device)
        if bool((keep[:, L:] == 0).any()):
            raise ValueError("ViLT image padding (pixel_mask with zeros) is not supported by vlprune.patch: resize the "
                             "images of a batch to one size")
        p.sync(hidden_states, encoder.training)
        text, image = p.encoder.run_joint(hidden_states[:, :L], keep[:, :L], hidden_states[:, L:],
                                          ReduceContext(generator=p.generator))
        p.last_tokens, p.last_aux = image.num_tokens, image.aux
        x = torch.cat([text, image.x], dim=1)
        return BaseModelOutput(last_hidden_state=x) if return_dict else (x,)

    return forward


@register_family("vilt", CLASSES, bench=("trips", "evit", "tome"))
def bind(model: nn.Module) -> Optional[Binding]:
    name = type(model).__name__
    if name not in CLASSES:
        return None
    vilt = model if name == "ViltModel" else model.vilt
    cfg = vilt.config

    def install(p: Patch) -> None:
        import inspect

        inner = vilt.forward
        sig = inspect.signature(inner)

        def vilt_forward(*args: Any, **kwargs: Any):
            a = sig.bind_partial(*args, **kwargs).arguments
            ids, emb = a.get("input_ids"), a.get("inputs_embeds")
            L = ids.shape[1] if ids is not None else (emb.shape[1] if emb is not None else None)
            with p.guided(None, text_len=L):
                return inner(*args, **kwargs)

        p.override(vilt, "forward", vilt_forward)
        p.override(vilt.encoder, "forward", encoder_forward(p, cfg, vilt.encoder))

    n = (cfg.image_size // cfg.patch_size) ** 2
    return Binding("vilt", "joint", views_of(vilt.encoder, cfg), cfg.hidden_size, cfg.hidden_size, n, CLASSES[name],
                   install)


__all__ = ["bind", "CLASSES"]
