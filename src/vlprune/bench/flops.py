"""FLOPs: counted by running the model, and an analytic count of the same configuration to check it against.

Counted FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products
(``mm``/``addmm``/``bmm``/``baddbmm``), convolutions and scaled-dot-product attention, 2 FLOPs per
multiply-add, and nothing else (no LayerNorm, softmax, GELU or gather). Out of the box it does not know
``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel SDPA runs on CPU), so attention would count as 0
on CPU; ``CPU_SDPA_FLOPS`` adds that op and its backward with PyTorch's own SDPA formulas.

The analytic count (``analytic_flops``) counts exactly what the counter counts, from the configuration and the
number of tokens each layer processes (``layer_tokens``, read from a traced run): per layer
``qkv 2·T·D·3D + attention 4·T²·D + proj 2·T·D² + MLP 4·T'·D·F`` (T tokens in the attention, T' in the MLP),
the patch embedding ``2·N·D·C·P²``, the text encoder, the fusion encoder's self- and cross-attention and the
ITM head. The reducers' own work (selection scores, look-ahead passes) is counted separately by module and is
not part of the analytic backbone count: ``counted.total - counted.select == analytic.total``.

Letters: B batch, T tokens (incl. [CLS]), N patches, D width, F MLP width, L text length, C channels, P patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig
from ..flopcount import CPU_SDPA_FLOPS, flop_counter_mode  # noqa: F401  (part of this module's API)

@dataclass(frozen=True)
class CountedFlops:
    """FLOPs counted while running the model. ``image``: the image encoder incl. its reducers (ALBEF's
    ``vision``; None for single-stream ViLT, which has no separate image encoder); ``select``: the reducers' own
    work (in any slot); ``by_module``: inclusive totals per module name (``ALBEF.vision.layers.4`` ...)."""

    total: int
    image: Optional[int]
    select: int
    by_module: Dict[str, int] = field(repr=False)


def _module_totals(fc: FlopCounterMode) -> Dict[str, int]:
    return {name: int(sum(ops.values())) for name, ops in fc.get_flop_counts().items()}


def count_flops(model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor) -> CountedFlops:
    """Run ``model(images, ids, mask)`` once under no_grad and count its FLOPs (all samples of the batch)."""
    root = type(model).__name__
    with torch.no_grad(), flop_counter_mode() as fc:
        model(images, ids, mask)
    return _counted(fc, root)


def _counted(fc: FlopCounterMode, root: str) -> CountedFlops:
    per = _module_totals(fc)
    select = sum(v for k, v in per.items() if k.split(".")[-1] == "reducer")
    image = per.get(f"{root}.vision", 0) if root == "ALBEF" else None
    return CountedFlops(total=int(fc.get_total_flops()), image=image, select=int(select), by_module=per)


# --------------------------------------------------------------------------------------------------------------
# Token counts per layer, from a traced run
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTokens:
    """Image tokens in one layer: ``attn`` in its (self- or cross-) attention, ``mlp`` after its reduction
    (what its MLP and the next layer see). Equal when the layer does not reduce."""

    attn: int
    mlp: int


def _after_counts(records: Sequence, num_layers: int, start: int) -> List[int]:
    """Tokens after each of ``num_layers`` layers from LayerTrace records (1-based ``layer``, ``tokens``)."""
    after: Dict[int, int] = {}
    for rec in records:
        after[rec.layer] = rec.tokens  # a later record of the same layer wins
    out, cur = [], start
    for i in range(1, num_layers + 1):
        cur = after.get(i, cur)
        out.append(cur)
    return out


@dataclass(frozen=True)
class TokenCounts:
    """Image tokens of one traced run: ``patches`` N entering the first layer (after any input resizing, e.g.
    the ``lowres`` method) and per slot group (``vision``/``fusion`` or ``joint``) one ``LayerTokens`` per layer."""

    patches: int
    layers: Dict[str, List[LayerTokens]]


def _embedded_tokens(model: nn.Module, run):
    """Run ``run()`` and return (its output, tokens (1 + N) out of the first image embedding that ran)."""
    from ..models.vit import ImageEmbeddings

    seen: List[int] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
             for m in model.modules() if isinstance(m, ImageEmbeddings)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} ran no image embedding; cannot count image tokens")
    return out, seen[0]


def layer_tokens(model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor) -> TokenCounts:
    """Image tokens per layer and slot group from one traced no-grad run.

    A reducer with ``where == "pre"`` (ViT layers only) reduces before the layer's attention; all others after it.
    """
    with torch.no_grad():
        out, n0 = _embedded_tokens(model, lambda: model(images, ids, mask, trace=True))
    cfg: ModelConfig = model.cfg
    slots = model.reduction_slots()
    if cfg.arch == "albef":
        vis_recs = tuple(out.image.trace)
        fus_recs = tuple(out.fused_image.trace)[len(vis_recs):]
        groups = {"vision": (vis_recs, n0), "fusion": (fus_recs, None)}
    else:
        groups = {"joint": (tuple(out.image.trace), n0)}
    result: Dict[str, List[LayerTokens]] = {}
    prev_end = n0
    for name, (recs, start) in groups.items():
        start = prev_end if start is None else start
        after = _after_counts(recs, len(slots[name]), start)
        rows, before = [], start
        for layer, a in zip(slots[name], after):
            pre = layer.reducer is not None and getattr(layer.reducer, "where", "mid") == "pre" and name == "vision"
            rows.append(LayerTokens(attn=a if pre else before, mlp=a))
            before = a
        result[name] = rows
        prev_end = before
    return TokenCounts(patches=n0 - 1, layers=result)


def tokens_after(counts: TokenCounts) -> Dict[str, List[int]]:
    """Image tokens after each layer, per slot group: {"vision": [...], "fusion": [...]} or {"joint": [...]}."""
    return {g: [t.mlp for t in rows] for g, rows in counts.layers.items()}


# --------------------------------------------------------------------------------------------------------------
# Analytic count
# --------------------------------------------------------------------------------------------------------------


def _self_attn_layer(t_attn: int, t_mlp: int, d: int, f: int) -> int:
    """One transformer layer: qkv, SDPA (q·kᵀ and attn·v), output projection, two MLP matmuls."""
    return 2 * t_attn * d * 3 * d + 4 * t_attn * t_attn * d + 2 * t_attn * d * d + 2 * 2 * t_mlp * d * f


def _fusion_layer(L: int, t_img: int, d: int, dv: int, f: int) -> int:
    """A fusion layer: text self-attention, cross-attention (q from L text rows, k/v from t_img image tokens of
    width dv), MLP over the text rows."""
    self_attn = 2 * L * d * 3 * d + 4 * L * L * d + 2 * L * d * d
    cross = 2 * L * d * d + 2 * t_img * dv * 2 * d + 4 * L * t_img * d + 2 * L * d * d
    return self_attn + cross + 2 * 2 * L * d * f


def analytic_flops(cfg: ModelConfig, text_len: int, counts: TokenCounts, batch: int = 1) -> Dict[str, int]:
    """FLOPs of one forward ``model(images, ids, mask)`` of the backbone (reducers' own work excluded).

    ``counts``: the patch count and per-layer image token counts (``layer_tokens``). Returns {"image", "text", "fusion", "heads",
    "total"} (ALBEF) or {"image" (patch embedding only), "joint", "heads", "total"} (ViLT), times ``batch``.
    """
    v, t = cfg.vision, cfg.text
    layers = counts.layers
    patch = 2 * counts.patches * v.width * v.channels * v.patch_size**2  # conv = a matmul per patch
    L = text_len
    if cfg.arch == "albef":
        image = patch + sum(_self_attn_layer(r.attn, r.mlp, v.width, v.mlp_dim) for r in layers["vision"])
        text = t.layers * _self_attn_layer(L, L, t.width, t.mlp_dim)
        fusion = sum(_fusion_layer(L, r.attn, t.width, v.width, t.mlp_dim) for r in layers["fusion"])
        heads = 2 * t.width * 2  # ITM head on the fused [CLS]
        out = {"image": image, "text": text, "fusion": fusion, "heads": heads}
    else:
        D = v.width
        joint = sum(_self_attn_layer(L + r.attn, L + r.mlp, D, v.mlp_dim) for r in layers["joint"])
        heads = 2 * D * D + 2 * D * 2  # pooler + ITM head
        out = {"image": patch, "joint": joint, "heads": heads}
    out = {k: batch * val for k, val in out.items()}
    out["total"] = sum(out.values())
    return out


__all__ = [
    "CPU_SDPA_FLOPS",
    "CountedFlops",
    "LayerTokens",
    "TokenCounts",
    "analytic_flops",
    "count_flops",
    "flop_counter_mode",
    "layer_tokens",
    "tokens_after",
]
