"""Visual grounding of referring expressions (``vlprune eval grounding``): ALBEF's weakly supervised protocol.

Heat (``gradcam_heat``): Grad-CAM of the ITM match logit on the cross-attention of one fusion layer (default the
middle one, ALBEF's layer 8 of 12 = the 3rd of 6 fusion layers): A = the cross-attention probabilities
(B, H, L, T), G = dA/ds with s = sum over the batch of the match logit; per image token,
heat = mean_heads mean_text(A * clamp(G, 0) * text mask) (the text mean over the padded length, as ALBEF).
Zero-shot alternative (``alignment_heat``, LAPS-style patch-word alignment, no grounding training): per image token,
the largest cosine over the caption's real words between the token and the word in the ITC embedding space.
Captioner alternative (``caption_heat``, vlprune's): the same Grad-CAM on a captioner's fusion cross-attention, of
the log-likelihood of the tokens that name the target when the expression is read as a caption
(``caption_targets``); on the built-in scenes it beats the ITM protocol when ITM has not learned
(docs/caption_grounding.md).

Under reduction the heat exists only for the surviving tokens. ``heat_to_grid`` maps it back onto the patch grid
through the trace's provenance: a kept token puts its heat on its patch; a token standing for several patches
(fused, merged) spreads it evenly over them (the trace records which patches a token covers, not the weights
that made it); a dropped patch gets nothing. This conserves mass (grid sum = token sum, the image [CLS] excluded),
so a large fused background token cannot flood the box sums.

Box choice (``box_scores``): the grid heat upsampled bicubic to the image's original size; each candidate box
[x, y, w, h] scores sum(heat inside) / sqrt(w h); the best scoring box (the best score starts at -inf: bicubic
upsampling can go negative) is a hit when its IoU with the ground truth is >= 0.5, IoU with inclusive pixels
(``iou``, ALBEF's ``computeIoU``). ``random_box_accuracy`` is the expected accuracy of picking a candidate
uniformly. ``kept_fraction`` is the share of ground-truth-box patches still kept as tokens of their own.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.formats import read_json
from ..reduce.state import ReduceContext

Box = Sequence[float]


# -- pure maths ----------------------------------------------------------------------------------------------------
def iou(a: Box, b: Box) -> float:
    """IoU of two [x, y, w, h] boxes with inclusive pixels, as ALBEF's ``computeIoU``."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if (x1 < x2 and y1 < y2) else 0
    return float(inter) / float(a[2] * a[3] + b[2] * b[3] - inter)


def upsample(grid: Tensor, height: int, width: int) -> Tensor:
    """(g, g) heat -> (height, width), bicubic."""
    return F.interpolate(grid[None, None].float(), size=(height, width), mode="bicubic", align_corners=False)[0, 0]


def box_scores(heat: Tensor, boxes: Sequence[Box]) -> List[float]:
    """Each [x, y, w, h] box's score on a (H, W) heat map: sum of heat[floor y : floor(y + h), floor x :
    floor(x + w)] / sqrt(w h)."""
    out = []
    for x, y, w, h in boxes:
        part = heat[int(math.floor(y)):int(math.floor(y + h)), int(math.floor(x)):int(math.floor(x + w))]
        out.append(float(part.sum()) / math.sqrt(w * h))
    return out


def pick_box(heat: Tensor, boxes: Sequence[Box]) -> int:
    """The index of the best-scoring box (the first of ties; the best starts at -inf)."""
    best, arg = -math.inf, 0
    for i, s in enumerate(box_scores(heat, boxes)):
        if s > best:
            best, arg = s, i
    return arg


def random_box_accuracy(entries: Sequence[Dict[str, Any]]) -> List[float]:
    """Per entry, the chance that a uniformly drawn candidate hits (IoU >= 0.5): the random-box baseline."""
    return [sum(iou(c, e["bbox"]) >= 0.5 for c in e["candidates"]) / len(e["candidates"]) for e in entries]


def heat_to_grid(heat: Tensor, source: Optional[Tensor], grid: int) -> Tensor:
    """Token heat (T,) (index 0 = image [CLS], ignored) -> (grid, grid) patch heat through provenance ``source``
    (T, 1 + N) 0/1 (None: no reduction, token k is patch k); mass-conserving (see the module docstring)."""
    if source is None:
        return heat[1:].reshape(grid, grid)
    src = source[:, 1:].float()
    share = src / src.sum(1, keepdim=True).clamp_min(1.0)  # each token's heat split evenly over its patches
    return (heat[1:, None] * share[1:]).sum(0).reshape(grid, grid)


def kept_fraction(source: Optional[Tensor], box: Box, grid: int, height: int, width: int) -> float:
    """The share of the patches whose centres lie in ``box`` [x, y, w, h] that are still kept (a surviving token
    stands for the patch alone)."""
    cy = (torch.arange(grid) + 0.5) * height / grid
    cx = (torch.arange(grid) + 0.5) * width / grid
    x, y, w, h = box
    inside = ((cy >= y) & (cy < y + h))[:, None] & ((cx >= x) & (cx < x + w))[None, :]
    if not inside.any():  # a box smaller than a patch: the patch under its centre
        inside = torch.zeros(grid, grid, dtype=torch.bool)
        inside[min(int((y + h / 2) * grid / height), grid - 1), min(int((x + w / 2) * grid / width), grid - 1)] = True
    if source is None:
        covered = torch.ones(grid * grid, dtype=torch.bool)
    else:  # kept = a surviving token stands for this patch alone (a fused or merged patch is not kept)
        src = source[:, 1:].bool()
        covered = src[src.sum(1) == 1].any(0)
    return float(covered.reshape(grid, grid)[inside].float().mean())


# -- heat from the model -------------------------------------------------------------------------------------------
def _fusion_with_attention(model: nn.Module, text: Tensor, mask: Tensor, image, layer: int, ctx: ReduceContext):
    """The fusion encoder with the cross-attention probabilities of fusion layer ``layer`` (0-based) made explicit
    (B, H, L, T) and part of the graph; -> (fused states, A, the image state that layer attended to).
    The chosen layer's own reduction slot is not run (grounding reads its input tokens)."""
    from ..models.attention import padding_bias

    bias = padding_bias(mask, text.dtype)
    x, A = text, None
    for i, lyr in enumerate(model.fusion.layers):
        if i != layer:
            x, image = lyr(x, bias, image, ctx.at(i, model.fusion))
            continue
        image_at = image  # the tokens this layer cross-attends to (after any earlier fusion-layer reduction)
        a, _, _ = lyr.attn(x, bias=bias)
        x = lyr.attn_ln(x + a)
        c = lyr.cross
        q = c._split(c.q(x), 1)[0]
        k, v = c._split(c.kv(image.x), 2).unbind(0)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        cb = image.cross_attention_bias(logits.dtype)
        A = (logits if cb is None else logits + cb).softmax(-1)
        A.retain_grad()
        out = (A @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        x = lyr.cross_ln(x + c.proj(out))
        x = lyr.mlp_ln(x + lyr.mlp(x))
    return x, A, image_at


def gradcam_heat(model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor, layer: Optional[int] = None):
    """(token heat (B, T), the image TokenState, traced) by Grad-CAM of the ITM match logit on fusion layer
    ``layer`` (0-based; default (n - 1) // 2, the 3rd of 6 as ALBEF). The image tokens are reduced text-guided by the
    referring expression, without gradient; only the fusion pass is differentiated."""
    n = len(model.fusion.layers)
    layer = (n - 1) // 2 if layer is None else int(layer)  # ALBEF: the 3rd of 6
    if not 0 <= layer < n:
        raise ValueError(f"grounding layer must be in [0, {n - 1}] (0-based fusion layer), got {layer}")
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        image = model.encode_image(images, text, mask, trace=True)
    with torch.enable_grad():
        image = image.replace(x=image.x.detach())
        fused, A, image = _fusion_with_attention(model, text.detach(), mask, image, layer,
                                                 model.context(text, mask))
        s = model.itm_head(fused[:, 0])[:, 1].sum()
        G = torch.autograd.grad(s, A)[0]
    m = mask[:, None, :, None].to(A.dtype)
    heat = (A.detach() * G.clamp_min(0) * m).mean(2).mean(1)  # (B, T): mean over text (padded length), heads
    return heat, image


def alignment_heat(model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor):
    """(token heat (B, T), traced image state): per token, the largest cosine between the token and a real word
    of the expression, in the ITC embedding space (zero-shot, LAPS-style patch-word alignment)."""
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        image = model.encode_image(images, text, mask, trace=True)
        v = F.normalize(model.vision_proj(image.x), dim=-1)
        t = F.normalize(model.text_proj(text), dim=-1)
        sim = v @ t.transpose(1, 2)  # (B, T, L)
        sim = sim.masked_fill(mask[:, None, :] == 0, -math.inf)
        sim[..., 0] = -math.inf  # the text [CLS] is not a word
    return sim.max(-1).values, image


def as_caption(expression: str) -> str:
    """A referring expression read as a caption of the scenes' style: "the small red triangle" -> "a small red
    triangle"."""
    words = expression.strip()
    words = words[4:] if words.lower().startswith("the ") else words
    return ("an " if words[:1].lower() in "aeiou" else "a ") + words


def caption_targets(tok, texts: Sequence[str], max_len: int, prompt: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(ids, mask, score) of ``prompt + as_caption(text)`` per text: score (B, L) is 1 at the positions whose next
    token belongs to the phrase naming the target (the caption up to " left of " / " right of ": a relation's
    anchor is not the target)."""
    caps = [as_caption(t) for t in texts]
    ids, mask = tok.encode([prompt + c for c in caps], max_len)
    score = torch.zeros_like(mask)
    start = len(tok.tok.encode(prompt, add_special_tokens=False).ids) + 1  # [CLS] + prompt
    for b, c in enumerate(caps):
        head = c.split(" left of ")[0].split(" right of ")[0]
        end = min(len(tok.tok.encode(prompt + head, add_special_tokens=False).ids) + 1, int(mask[b].sum()) - 1)
        score[b, start - 1:end - 1] = 1  # position i predicts token i + 1
    return ids, mask, score


def caption_heat(model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor, score: Tensor,
                 layer: Optional[int] = None):
    """(token heat (B, T), traced image state): Grad-CAM, on the cross-attention of the captioner's fusion layer
    ``layer`` (default the middle one), of the log-likelihood of the target's tokens (``caption_targets``) given
    the image. The image tokens are reduced guided by the caption's text, without gradient."""
    from ..models.captioner import cross_attention_probs, image_kv

    n = len(model.fusion.layers)
    layer = (n - 1) // 2 if layer is None else int(layer)
    with torch.no_grad():
        image = model.encode_image(images, model.encode_text(ids, mask), mask, trace=True)
    with torch.enable_grad():
        image = image.replace(x=image.x.detach())
        logits, A = cross_attention_probs(model, ids, mask, image_kv(model, image), layer)
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        s = (lp * score[:, :-1]).sum()
        G = torch.autograd.grad(s, A)[0]
    m = score[:, None, :, None].to(A.dtype)
    return (A.detach() * G.clamp_min(0) * m).mean(2).mean(1), image


# -- data ----------------------------------------------------------------------------------------------------------
def _is_box(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            and v[2] > 0 and v[3] > 0)


def load_grounding(path, dets: Optional[str] = None) -> List[Dict[str, Any]]:
    """RefCOCO+-style grounding entries: {"image", "text", "bbox": [x, y, w, h], "candidates": [[x, y, w, h], ...],
    "width"?, "height"?, "ref_id"?, "image_id"?}. ``dets`` (ALBEF's dets.json, {str(image_id): [[x, y, w, h, ...]]})
    supplies the candidates of entries that have none. Boxes must lie inside the image when its size is given."""
    entries = read_json(path)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of grounding entries")
    table = read_json(dets) if dets else None
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: entry {i} must be an object")
        for f in ("image", "text"):
            if not isinstance(e.get(f), str) or not e[f].strip():
                raise ValueError(f"{path}: entry {i} field {f!r} must be a non-empty string, got {e.get(f)!r}")
        if not _is_box(e.get("bbox")):
            raise ValueError(f"{path}: entry {i} field 'bbox' must be [x, y, w, h] with w, h > 0, got {e.get('bbox')!r}")
        cands = e.get("candidates")
        if cands is None and table is not None:
            cands = [c[:4] for c in table.get(str(e.get("image_id")), [])]
        if cands is None:
            raise ValueError(f"{path}: entry {i} has no field 'candidates' (candidate boxes [[x, y, w, h], ...]; or "
                             "give a dets.json)")
        if not isinstance(cands, list) or not cands or not all(_is_box(c) for c in cands):
            raise ValueError(f"{path}: entry {i} field 'candidates' must be a non-empty list of [x, y, w, h] boxes")
        W, H = e.get("width"), e.get("height")
        if isinstance(W, (int, float)) and isinstance(H, (int, float)):
            for name, b in [("bbox", e["bbox"])] + [(f"candidates[{j}]", c) for j, c in enumerate(cands)]:
                if b[0] < 0 or b[1] < 0 or b[0] + b[2] > W + 1e-6 or b[1] + b[3] > H + 1e-6:
                    raise ValueError(f"{path}: entry {i} {name} {b} lies outside the {W}x{H} image")
        out.append({**e, "candidates": cands})
    return out


# -- evaluation ----------------------------------------------------------------------------------------------------
MODES = ("itm", "align", "caption")


def ground_batch(model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor, entries: Sequence[Dict[str, Any]],
                 sizes: Sequence[Tuple[int, int]], mode: str = "itm", layer: Optional[int] = None,
                 score: Optional[Tensor] = None) -> List[Dict[str, Any]]:
    """Per entry: {"hit", "choice", "kept", "grid" (patch heat), "tokens" (image tokens heat was read on)} for a
    batch (sizes: original (width, height) per entry). Mode "caption" takes ids / mask / score from
    ``caption_targets``."""
    if mode == "itm":
        heat, image = gradcam_heat(model, images, ids, mask, layer)
    elif mode == "align":
        heat, image = alignment_heat(model, images, ids, mask)
    elif mode == "caption" and score is not None:
        heat, image = caption_heat(model, images, ids, mask, score, layer)
    else:
        raise ValueError(f"grounding mode must be 'itm' (Grad-CAM of ITM), 'align' (patch-word alignment) or "
                         f"'caption' (Grad-CAM of a captioner, with a score mask), got {mode!r}")
    grid = int(round(model.cfg.vision.num_patches ** 0.5))
    out = []
    for b, e in enumerate(entries):
        W, H = sizes[b]
        src = None if image.source is None else image.source[b].cpu()
        g = heat_to_grid(heat[b].float().cpu(), src, grid)
        choice = pick_box(upsample(g, H, W), e["candidates"])
        out.append({"hit": float(iou(e["candidates"][choice], e["bbox"]) >= 0.5), "choice": choice,
                    "kept": kept_fraction(src, e["bbox"], grid, H, W), "grid": g, "tokens": image.num_tokens})
    return out


def evaluate_grounding(model: nn.Module, entries: Sequence[Dict[str, Any]], loader, tok, batch_size: int = 32,
                       mode: str = "itm", layer: Optional[int] = None) -> Dict[str, Any]:
    """{"accuracy", "random_accuracy", "kept_fraction" (x100), "hits" (per entry), "examples", "image_tokens"}."""
    from ..data.datasets import load_entry_image
    from ..data.images import open_image

    if getattr(model.cfg, "arch", None) != "albef":
        raise ValueError(f"grounding needs a two-stream model (arch='albef'), got {model.cfg.arch!r}")
    dev = next(model.parameters()).device
    model.eval()
    hits: List[float] = []
    kept: List[float] = []
    tokens = 0.0
    for s in range(0, len(entries), batch_size):
        chunk = entries[s:s + batch_size]
        images = torch.stack([load_entry_image(loader, e["image"], s + j) for j, e in enumerate(chunk)]).to(dev)
        score = None
        if mode == "caption":
            from .caption import PROMPT

            ids, mask, score = caption_targets(tok, [e["text"] for e in chunk], model.cfg.text.max_len, PROMPT)
        else:
            ids, mask = tok.encode([e["text"] for e in chunk], model.cfg.text.max_len)
        sizes = []
        for e in chunk:
            if isinstance(e.get("width"), (int, float)) and isinstance(e.get("height"), (int, float)):
                sizes.append((int(e["width"]), int(e["height"])))
            else:
                sizes.append(open_image(loader.path(e["image"]), loader.max_pixels).size)
        res = ground_batch(model, images, ids.to(dev), mask.to(dev), chunk, sizes, mode, layer,
                           None if score is None else score.to(dev))
        hits += [r["hit"] for r in res]
        kept += [r["kept"] for r in res]
        tokens += sum(r["tokens"] for r in res)
    rnd = random_box_accuracy(entries)
    return {"accuracy": 100 * float(np.mean(hits)), "random_accuracy": 100 * float(np.mean(rnd)),
            "kept_fraction": 100 * float(np.mean(kept)), "hits": hits, "random_hits": rnd,
            "examples": len(entries), "image_tokens": tokens / len(entries)}


__all__ = ["iou", "box_scores", "pick_box", "heat_to_grid", "kept_fraction", "random_box_accuracy", "gradcam_heat",
           "alignment_heat", "caption_heat", "caption_targets", "as_caption", "load_grounding", "ground_batch",
           "evaluate_grounding", "MODES"]
