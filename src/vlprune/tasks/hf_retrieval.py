"""Image-text retrieval of Hugging Face models (``vlprune eval retrieval --hf``): ``CLIPModel`` ranks by ITC alone
(``evaluate_clip_retrieval``: normalised projected image and text embeddings, each image and caption encoded once;
only image-only methods, since a text-guided one would make every image embedding depend on the caption).
``ViltForImageAndTextRetrieval`` and ``BridgeTowerForImageAndTextRetrieval`` have no text-free first stage:
``evaluate_pair_retrieval`` scores every image-caption pair with the model's own retrieval logit (up to
``max_pairs`` pairs).

Two-stage image-text retrieval of a Hugging Face ``BlipForImageTextRetrieval``,
optionally patched by ``vlprune.patch``, with the protocol of ``tasks.retrieval``:

1. ITC: every image encoded once without text (a text-guided method leaves the vision tower unreduced here, an
   image-only method reduces), every caption once; similarity = normalised ``vision_proj`` [CLS] x ``text_proj``
   [CLS], as BLIP's ITC head computes it.
2. ITM: for each image its top-``k`` captions, and for each caption its top-``k`` images, re-ranked by the ITM head
   (match probability), where a text-guided method reduces the image tokens with each pair's caption as guide.

Recall@K both ways from ``tasks.metrics.retrieval_metrics``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.images import open_image
from ..patch import get_patch
from .metrics import retrieval_metrics
from .retrieval_task import _caption_index


def _text_free(model: nn.Module):
    p = get_patch(model)
    return p.guided(None, text_free=True) if p is not None else contextlib.nullcontext()


def _itm(model: nn.Module, px: Tensor, ids: Tensor, mask: Tensor, batch_size: int) -> Tensor:
    """Match probability of each (image, caption) pair, batched."""
    out = []
    for s in range(0, len(ids), batch_size):
        e = slice(s, s + batch_size)
        logits = model(input_ids=ids[e], pixel_values=px[e], attention_mask=mask[e], use_itm_head=True).itm_score
        out.append(logits.float().softmax(-1)[:, 1])
    return torch.cat(out)


def _two_way_metrics(i2t: Tensor, t2i: Tensor, img2txt, txt2img) -> Dict[str, float]:
    """Recall@1/5/10 image-to-text from ``i2t``, text-to-image from ``t2i`` (both (images, captions)), their means
    and ``r_mean``."""
    a, b = retrieval_metrics(i2t, img2txt, txt2img), retrieval_metrics(t2i, img2txt, txt2img)
    metrics = {key: v for key, v in a.items() if key.startswith("txt_")}
    metrics.update({key: v for key, v in b.items() if key.startswith("img_")})
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def evaluate_blip_retrieval(model: nn.Module, processor: Any, entries: Sequence[Dict[str, Any]], image_root: Path,
                            k: int = 128, batch_size: int = 32, progress: bool = True) -> Dict[str, Any]:
    from tqdm import tqdm

    if type(model).__name__ != "BlipForImageTextRetrieval":
        raise ValueError(f"vlprune eval retrieval --hf needs a BlipForImageTextRetrieval, got {type(model).__name__}")
    if k < 1:
        raise ValueError(f"--k (ITM re-ranking candidates) must be >= 1, got {k}")
    dev = next(model.parameters()).device
    img2txt, txt2img, captions = _caption_index(entries)
    px = torch.cat([processor(images=[open_image(image_root / e["image"]) for e in entries[s : s + batch_size]],
                              return_tensors="pt")["pixel_values"] for s in range(0, len(entries), batch_size)]).to(dev)
    tok = processor(text=captions, return_tensors="pt", padding=True)
    ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        with _text_free(model):
            img = torch.cat([model.vision_model(pixel_values=px[s : s + batch_size]).last_hidden_state[:, 0]
                             for s in range(0, len(px), batch_size)])
        txt = torch.cat([model.text_encoder(input_ids=ids[s : s + batch_size], attention_mask=mask[s : s + batch_size])
                         .last_hidden_state[:, 0] for s in range(0, len(ids), batch_size)])
        sim = F.normalize(model.vision_proj(img), dim=-1) @ F.normalize(model.text_proj(txt), dim=-1).t()
        itc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_img, n_txt = sim.shape
        i2t = torch.full((n_img, n_txt), -100.0)
        t2i = torch.full((n_img, n_txt), -100.0)
        for i in tqdm(range(n_img), disable=not progress, desc="eval retrieval (hf, ITM i2t)", unit="image"):
            cand = sim[i].topk(min(k, n_txt)).indices
            i2t[i, cand.cpu()] = _itm(model, px[i : i + 1].expand(len(cand), -1, -1, -1), ids[cand], mask[cand],
                                      batch_size).cpu()
        for t in tqdm(range(n_txt), disable=not progress, desc="eval retrieval (hf, ITM t2i)", unit="caption"):
            cand = sim[:, t].topk(min(k, n_img)).indices
            t2i[cand.cpu(), t] = _itm(model, px[cand], ids[t : t + 1].expand(len(cand), -1),
                                      mask[t : t + 1].expand(len(cand), -1), batch_size).cpu()
    metrics = _two_way_metrics(i2t, t2i, img2txt, txt2img)
    metrics["itc_r_mean"] = retrieval_metrics(sim.cpu(), img2txt, txt2img)["r_mean"]
    return {"metrics": metrics, "images": n_img, "captions": n_txt, "itc_seconds": itc_s,
            "itm_seconds": time.perf_counter() - t0, "scores_i2t": i2t, "scores_t2i": t2i}


def _features(out: Any) -> Tensor:
    """``get_image_features`` / ``get_text_features``: a tensor in transformers 4.x, an output whose
    ``pooler_output`` holds the projected features in 5.x."""
    return out if isinstance(out, Tensor) else out.pooler_output


def evaluate_clip_retrieval(model: nn.Module, processor: Any, entries: Sequence[Dict[str, Any]], image_root: Path,
                            batch_size: int = 32, progress: bool = True) -> Dict[str, Any]:
    """ITC ranking of a (patched) ``CLIPModel``: cosine of ``get_image_features`` and ``get_text_features``; the
    image tokens after the patched vision tower are reported as ``image_tokens`` (None unpatched)."""
    from tqdm import tqdm

    if type(model).__name__ != "CLIPModel":
        raise ValueError(f"CLIP retrieval needs a CLIPModel, got {type(model).__name__}")
    p = get_patch(model)
    if p is not None and p.spec.text_guided:
        raise ValueError(f"--method {p.config.name} is text-guided: on CLIP it would make every image embedding depend "
                         "on the caption, so ITC ranking (each image embedded once) cannot use it; use an image-only "
                         "method (evit, tome, dynamicvit, random)")
    dev = next(model.parameters()).device
    img2txt, txt2img, captions = _caption_index(entries)
    t0 = time.perf_counter()
    img, txt, tokens = [], [], []
    with torch.inference_mode():
        for s in tqdm(range(0, len(entries), batch_size), disable=not progress, desc="eval retrieval (hf, images)",
                      unit="batch"):
            px = processor(images=[open_image(image_root / e["image"]) for e in entries[s : s + batch_size]],
                           return_tensors="pt")["pixel_values"].to(dev)
            img.append(_features(model.get_image_features(pixel_values=px)).float())
            if p is not None and p.last_tokens is not None:
                tokens.append(p.last_tokens)
        for s in range(0, len(captions), batch_size):
            tok = processor(text=captions[s : s + batch_size], return_tensors="pt", padding=True)
            txt.append(_features(model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                                         attention_mask=tok["attention_mask"].to(dev))).float())
    sim = (F.normalize(torch.cat(img), dim=-1) @ F.normalize(torch.cat(txt), dim=-1).t()).cpu()
    m = retrieval_metrics(sim, img2txt, txt2img)
    return {"metrics": m, "images": len(entries), "captions": len(captions), "itc_seconds": time.perf_counter() - t0,
            "itm_seconds": 0.0, "scores": sim, "image_tokens": sum(tokens) / len(tokens) if tokens else None}


PAIR_CLASSES = ("ViltForImageAndTextRetrieval", "BridgeTowerForImageAndTextRetrieval")
MAX_PAIRS = 20000


def _pair_score(model: nn.Module, inputs: Dict[str, Tensor]) -> Tensor:
    """The model's own retrieval logit of each pair: ViLT's one logit, BridgeTower's match logit (index 1)."""
    logits = model(**inputs).logits.float()
    return logits[:, 0] if type(model).__name__ == "ViltForImageAndTextRetrieval" else logits[:, 1]


def evaluate_pair_retrieval(model: nn.Module, processor: Any, entries: Sequence[Dict[str, Any]], image_root: Path,
                            batch_size: int = 32, max_pairs: int = MAX_PAIRS, progress: bool = True) -> Dict[str, Any]:
    """Retrieval with a model that has no text-free first stage (``ViltForImageAndTextRetrieval``,
    ``BridgeTowerForImageAndTextRetrieval``): every (image, caption) pair scored by the (patched) model's own
    retrieval logit, ``batch_size`` pairs a call; a text-guided method reduces each pair with its own caption. The
    images x captions score matrix ranks both ways. Each image is processed on its own (no image padding, which a
    patched ViLT or BridgeTower refuses) and a batch holds images of one size."""
    from tqdm import tqdm

    name = type(model).__name__
    if name not in PAIR_CLASSES:
        raise ValueError(f"pair-scoring retrieval needs one of {list(PAIR_CLASSES)}, got {name}")
    img2txt, txt2img, captions = _caption_index(entries)
    n_img, n_txt = len(entries), len(captions)
    if n_img * n_txt > max_pairs:
        raise ValueError(f"{name} scores every image-caption pair: {n_img} images x {n_txt} captions = "
                         f"{n_img * n_txt} pairs, more than --max-pairs {max_pairs}; raise --max-pairs (the time grows "
                         "with images x captions) or evaluate a smaller test file")
    dev = next(model.parameters()).device
    pix = [{k: v.to(dev) for k, v in processor.image_processor(images=[open_image(image_root / e["image"])],
                                                               return_tensors="pt").items()} for e in entries]
    text = {k: v.to(dev) for k, v in processor.tokenizer(captions, return_tensors="pt", padding=True,
                                                         truncation=True).items()}
    groups: Dict[tuple, list] = {}
    for i, x in enumerate(pix):
        groups.setdefault(tuple(x["pixel_values"].shape), []).append(i)
    if progress:
        print(f"scoring {n_img} x {n_txt} = {n_img * n_txt} image-caption pairs with {name}'s retrieval head")
    scores = torch.empty(n_img, n_txt)
    p = get_patch(model)
    tokens, counted = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode(), tqdm(total=n_img * n_txt, disable=not progress, unit="pair",
                                      desc="eval retrieval (hf, pairs)") as bar:
        for rows in groups.values():
            imgs = {k: torch.cat([pix[i][k] for i in rows]) for k in pix[rows[0]]}
            pi = torch.arange(len(rows)).repeat_interleave(n_txt)
            pt = torch.arange(n_txt).repeat(len(rows))
            for s in range(0, len(pi), batch_size):
                a, b = pi[s : s + batch_size], pt[s : s + batch_size]
                inputs = {k: v[a.to(dev)] for k, v in imgs.items()}
                inputs.update({k: v[b.to(dev)] for k, v in text.items()})
                scores[torch.as_tensor(rows)[a], b] = _pair_score(model, inputs).cpu()
                if p is not None and p.last_tokens is not None:
                    tokens, counted = tokens + p.last_tokens * len(a), counted + len(a)
                bar.update(len(a))
    metrics = _two_way_metrics(scores, scores, img2txt, txt2img)
    return {"metrics": metrics, "images": n_img, "captions": n_txt, "pairs": n_img * n_txt,
            "pair_seconds": time.perf_counter() - t0, "scores": scores,
            "image_tokens": tokens / counted if counted else None}


__all__ = ["evaluate_blip_retrieval", "evaluate_clip_retrieval", "evaluate_pair_retrieval", "PAIR_CLASSES", "MAX_PAIRS"]
