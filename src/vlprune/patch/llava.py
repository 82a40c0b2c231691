"""LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower, MLP projector, Llama / Qwen2 decoder; a fixed
grid of N image tokens per image, N copies of ``image_token_id`` in ``input_ids``).

Three placements (the method's slot group says which):
- "llm": FastV, TRIPS-LVLM in the decoder layers (``lvlm.py``); ``input_ids`` stay as they are, the LLM drops
  image tokens at prefill; ``forward`` returns logits over the kept sequence (loss with ``labels`` is refused).
- "vision": EViT, ToMe, random in the CLIP tower's layers (vlprune's own reducers on ``LayerView``s);
- "projector": VisionZip on the tower's feature-layer output.
  For these two the tower returns fewer tokens per image, so ``forward`` / ``generate`` first remove the unused
  image placeholders from ``input_ids`` / ``attention_mask`` / ``labels`` (keeping the first k of each image's
  run; positions become contiguous; rows re-padded on the left when their lengths differ). ``generate`` returns
  the caller's original prompt followed by the new tokens, as without the patch.
"""

from __future__ import annotations

import functools
import contextvars
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reduce.state import ReduceContext, TokenState
from . import clip
from .base import Binding, Offer, Patch, register_family
from .layers import EncoderView
from .lvlm import LLMSlot, install_llm, no_tower_guide

# the slot groups: "llm" (FastV, TRIPS-LVLM), "vision" (CLIP tower: EViT, ToMe, random), "projector" (VisionZip)
OFFER = Offer({"llm": True, "vision": True, "projector": True},
              guide="the prompt guides the selection inside the language model",
              excluded={"trips": no_tower_guide("LLaVA"),
                        "elip": "it needs the text encoder's guide; use trips_llm",
                        "dynamicvit": "it is not wired into LLaVA", "lowres": "it is not wired into LLaVA"},
              reasons={"tip": "it needs a cross-modal encoder", "laps": "it is not wired into LLaVA"})
CLASSES = {"LlavaForConditionalGeneration": OFFER}


class ProjectorSlot:
    """The one slot at the vision tower's output (VisionZip)."""

    reducer: Optional[nn.Module] = None

    def __init__(self) -> None:
        self.reducer = None


# -- pure functions ---------------------------------------------------------------------------------------------
def placeholder_keep(ids: Tensor, image_id: int, k: int) -> Tensor:
    """ids (B, L) -> keep (B, L) bool: every token except the image placeholders after the first k of each run
    (one run per image). A run shorter than k raises."""
    img = ids == image_id
    start = img & ~F.pad(img[:, :-1], (1, 0), value=False)
    idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    within = idx - torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values
    end = img & ~F.pad(img[:, 1:], (0, 1), value=False)
    if bool((within[end] + 1 < k).any()):
        raise ValueError(f"an image has fewer placeholders ({(within[end] + 1).min().item()}) than the {k} features "
                         "the patched vision tower returns")
    return ~img | (within < k)


def select_columns(t: Optional[Tensor], keep: Tensor, fill: int) -> Optional[Tensor]:
    """The kept columns of t (B, L) per row, left-padded with ``fill`` to the longest row."""
    if t is None:
        return None
    n = keep.sum(1)
    if bool((n == n[0]).all()):
        return t[keep].view(t.shape[0], -1)
    out = torch.full((t.shape[0], int(n.max())), fill, dtype=t.dtype, device=t.device)
    for b in range(t.shape[0]):
        out[b, out.shape[1] - int(n[b]):] = t[b, keep[b]]
    return out


def cls_attention_and_keys(view, x_in: Tensor) -> Tuple[Tensor, Tensor]:
    """The [CLS] attention row (B, N) summed over heads and the head-mean keys (B, 1 + N, d) of one vision layer
    on its input x_in (B, 1 + N, D): one query row, never the full map."""
    h = view.ln1(x_in)
    q = view.attn.project_query(h[:, :1])  # (B, H, 1, d)
    k = view.attn.project_key(h)  # (B, H, T, d)
    a = (q.float() @ k.float().transpose(-1, -2) * view.attn.head_dim ** -0.5).softmax(-1)[:, :, 0]  # (B, H, T)
    return a.sum(1)[:, 1:], k.mean(1)


# -- the vision tower -------------------------------------------------------------------------------------------
def feature_layer(model: nn.Module, num_layers: int) -> int:
    """hidden_states index the LLaVA model reads (vision_feature_layer, e.g. -2 -> num_layers - 1)."""
    f = model.config.vision_feature_layer
    if not isinstance(f, int):
        raise ValueError(f"vlprune.patch supports one vision_feature_layer, got {f!r}")
    return f if f >= 0 else num_layers + 1 + f


def tower_forward(p: Patch, views: List[Any], proj: ProjectorSlot, f: int, full: bool, cache: contextvars.ContextVar,
                  tower: nn.Module) -> Callable:
    """Replacement of the CLIP tower's ``forward``: layers 1..f with their slots, VisionZip at layer f; returns
    ``hidden_states`` whose entry f is the reduced feature ([CLS] duplicated first under the "default" strategy,
    which drops entry 0); the layers after f are not run (their entries are None)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    vm, vc = clip.vision_parts(tower)
    enc = EncoderView(views)

    def forward(pixel_values: Tensor, *args: Any, **kwargs: Any):
        hit = cache.get()
        if hit is not None and hit[0] is pixel_values:
            return hit[1]
        x = vm.pre_layrnorm(vm.embeddings(pixel_values.to(vm.pre_layrnorm.weight.dtype)))
        p.sync(x, tower.training)
        state = TokenState.start(x)
        ctx = ReduceContext(generator=p.generator, num_patches=state.num_tokens - 1)
        hs: List[Optional[Tensor]] = [x]
        for i in range(f):
            x_in = state.x
            state = views[i].vision(state, ctx.at(i, enc))
            hs.append(state.x)
        out = hs[f]
        r = proj.reducer
        budget = None if r is None else r.budget(x.shape[1] - 1)
        if budget is not None:
            from ..reduce.visionzip import visionzip

            cls_attn, keys = cls_attention_and_keys(views[f - 1], x_in)
            out = visionzip(out, cls_attn, keys, *budget)
            if not full:
                out = torch.cat([out[:, :1], out], 1)  # the "default" strategy drops entry 0
            hs[f] = out
        hs += [None] * (len(views) - f)
        p.last_tokens = out.shape[1] - (0 if full else 1)
        return BaseModelOutputWithPooling(last_hidden_state=out, pooler_output=vm.post_layernorm(out[:, 0]),
                                          hidden_states=tuple(hs))

    return forward


def before_llm_call(fn: Callable, count: Callable[[Tensor, Dict[str, Any]], Tuple[Optional[int], Any]],
                    cache: contextvars.ContextVar, image_id: int, pad_id: int, generate: bool) -> Callable:
    """Wrap ``forward`` / ``generate``: learn how many image features the patched tower gives per image (``count``:
    (k or None when unchanged, a tower output to reuse or None)), drop the unused placeholders, call, restore the
    prompt."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        if args:
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments
            except TypeError:
                return fn(*args, **kwargs)
            if generate and "inputs" in bound:
                bound["input_ids"] = bound.pop("inputs")
            extra = bound.pop("kwargs", {})
            kwargs = {**bound, **extra}
        ids, px = kwargs.get("input_ids"), kwargs.get("pixel_values")
        if ids is None or px is None:
            return fn(**kwargs)
        k, hit = count(px, kwargs)
        if k is None:
            return fn(**kwargs)
        keep = placeholder_keep(ids, image_id, k)
        if bool(keep.all()):
            return fn(**kwargs)
        new = dict(kwargs, input_ids=select_columns(ids, keep, pad_id))
        mask = kwargs.get("attention_mask")
        new["attention_mask"] = select_columns(mask if mask is not None else torch.ones_like(ids), keep, 0)
        if kwargs.get("labels") is not None:
            new["labels"] = select_columns(kwargs["labels"], keep, -100)
        token = cache.set(hit)
        try:
            res = fn(**new)
        finally:
            cache.reset(token)
        return restore_prompt(res, ids, new["input_ids"].shape[1]) if generate else res

    return wrapper


def install_tower(p: Patch, model: nn.Module, vb: Any, proj: ProjectorSlot, count: Callable) -> None:
    """The overrides of a tower-side method (groups "vision", "projector") on a LLaVA-style model: the tower's
    ``forward`` and the model's ``forward`` / ``generate`` (``count`` as in ``before_llm_call``)."""
    cfg, tower = model.config, model.model.vision_tower
    f = feature_layer(model, len(vb.views))
    late = [i + 1 for i, v in enumerate(vb.views) if v.reducer is not None and i + 1 > f]
    if late:
        raise ValueError(f"{p.config.name}: vision layer(s) {late} come after LLaVA's feature layer {f}, whose output "
                         f"the projector reads; choose layers in [1, {f}]")
    cache: contextvars.ContextVar = contextvars.ContextVar(f"vlprune_tower_{id(p)}", default=None)
    full = cfg.vision_feature_select_strategy == "full"
    p.override(tower, "forward", tower_forward(p, vb.views, proj, f, full, cache, tower))
    pad = cfg.text_config.pad_token_id if getattr(cfg.text_config, "pad_token_id", None) is not None else 0
    for meth in ("forward", "generate"):
        p.override(model, meth, before_llm_call(getattr(model, meth), lambda px, kw: count(p, px, kw, tower), cache,
                                                cfg.image_token_id, pad, meth == "generate"))


def restore_prompt(res: Any, ids: Tensor, reduced_len: int) -> Any:
    """generate's output with the caller's prompt in front of the new tokens (instead of the reduced prompt)."""
    seq = res if isinstance(res, Tensor) else getattr(res, "sequences", None)
    if seq is None:
        return res
    rep = seq.shape[0] // ids.shape[0]
    full = torch.cat([ids.repeat_interleave(rep, 0), seq[:, reduced_len:]], 1)
    if isinstance(res, Tensor):
        return full
    res.sequences = full
    return res


@register_family("llava", CLASSES)
def bind(model: nn.Module) -> Optional[Binding]:
    name = type(model).__name__
    if name not in CLASSES:
        return None
    inner = model.model
    lm, tower = inner.language_model, inner.vision_tower
    vb = clip.bind(tower)
    if vb is None:
        raise ValueError(f"vlprune.patch supports LLaVA with a CLIP vision tower, got {type(tower).__name__}")
    slots = [LLMSlot(layer, i) for i, layer in enumerate(lm.layers)]
    proj = ProjectorSlot()
    cfg = model.config

    def count(p: Patch, px: Tensor, kwargs: Dict[str, Any], tower: nn.Module) -> Tuple[int, Any]:
        out = tower(px)  # once; the model's own call reuses it
        return p.last_tokens, (px, out)

    def install(p: Patch) -> None:
        group = p.spec.groups[0] if p.spec.groups else None
        if group == "llm":
            install_llm(p, model, slots, cfg.image_token_id)
        elif group in ("vision", "projector"):
            install_tower(p, model, vb, proj, count)

    return Binding("llava", "llm", slots, vb.vision_width, cfg.text_config.hidden_size, vb.num_patches,
                   CLASSES[name], install, more={"vision": vb.views, "projector": [proj]})


__all__ = ["bind", "CLASSES", "placeholder_keep", "select_columns", "install_tower", "ProjectorSlot"]
