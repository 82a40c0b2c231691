"""Two-stage image-text retrieval evaluation, as ALBEF does (``docs/methods.md``, "Retrieval with text-guided methods").

Stage 1 (ITC): every image is encoded once *without text guidance* — unpruned when the installed method is
text-guided, with the method itself when it needs no text — and every caption once; all pairs are scored by the
dot product of their ITC embeddings. Stage 2 (ITM): for every image its top-k captions, and for every caption its
top-k images, are re-scored by the ITM head on the *text-guided* image tokens computed for that pair. Pairs
outside the top-k keep a score of -100 (below any ITM logit), as in ALBEF. Both stages' costs are reported.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..reduce.registry import installed_spec
from .metrics import retrieval_metrics

@contextlib.contextmanager
def reducers_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily empty every reduction slot (the weights of the reducers are kept and restored)."""
    saved = []
    for layers in model.reduction_slots().values():
        for layer in layers:
            saved.append((layer, layer.reducer))
            layer.reducer = None
    try:
        yield
    finally:
        for layer, r in saved:
            layer.reducer = r


def is_text_guided(model: nn.Module) -> bool:
    """Whether the installed method's image tokens depend on the caption (it cannot run in the text-free stage)."""
    spec = installed_spec(model)
    return spec is not None and not spec.runs_in_text_free_stage


@dataclass
class RetrievalCost:
    itc_seconds: float = 0.0
    itm_seconds: float = 0.0
    itm_pairs: int = 0
    stage1_unpruned: bool = True
    extra: Dict[str, float] = field(default_factory=dict)


def _batches(n: int, bs: int):
    for s in range(0, n, bs):
        yield slice(s, min(n, s + bs))


@torch.inference_mode()
def itc_stage(
    model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor, batch_size: int = 64
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Image embeddings (text-free), caption states and embeddings -> (sim_i2t, text_states, image_embeds, text_embeds)."""
    ctx = reducers_disabled(model) if is_text_guided(model) else contextlib.nullcontext()
    img_emb = []
    with ctx:
        for sl in _batches(images.shape[0], batch_size):
            img_emb.append(model.image_embed(model.encode_image(images[sl])))
    txt_states, txt_emb = [], []
    for sl in _batches(ids.shape[0], batch_size):
        t = model.encode_text(ids[sl], mask[sl])
        txt_states.append(t)
        txt_emb.append(model.text_embed(t))
    img_e, txt_e = torch.cat(img_emb), torch.cat(txt_emb)
    return img_e @ txt_e.t(), torch.cat(txt_states), img_e, txt_e


@torch.inference_mode()
def itm_scores(
    model: nn.Module, images: Tensor, text_states: Tensor, mask: Tensor, generator=None
) -> Tensor:
    """ITM match logit for aligned (image, caption) pairs, with text-guided image tokens: (P,) ."""
    image = model.encode_image(images, text_states, mask, generator)
    fused, _ = model.fuse(text_states, mask, image, generator)
    return model.itm_head(fused[:, 0])[:, 1].float()


@torch.inference_mode()
def evaluate_retrieval(
    model: nn.Module,
    images: Tensor,
    ids: Tensor,
    mask: Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    k: int = 128,
    batch_size: int = 64,
    progress=None,
    rank: int = 0,
    world: int = 1,
) -> Tuple[Dict[str, float], RetrievalCost]:
    """Recall@K of the two-stage protocol. images (n_img, 3, S, S); ids/mask (n_txt, L).

    Under DDP (``world`` > 1, every rank holding all images and captions) each rank re-ranks every
    ``world``-th query and the score matrices are combined on all ranks (max over ranks: unscored pairs are -100)."""
    if getattr(model.cfg, "arch", None) != "albef":
        raise ValueError("two-stage retrieval needs a two-stream model (arch='albef') with ITC and ITM heads")
    if k < 1:
        raise ValueError(f"k (ITM re-ranking candidates) must be >= 1, got {k}")
    model.eval()
    cost = RetrievalCost(stage1_unpruned=is_text_guided(model))
    t0 = time.perf_counter()
    sim, txt_states, _, _ = itc_stage(model, images, ids, mask, batch_size)
    cost.itc_seconds = time.perf_counter() - t0
    n_img, n_txt = sim.shape
    t0 = time.perf_counter()
    scores_i2t = torch.full((n_img, n_txt), -100.0, device=sim.device)
    scores_t2i = torch.full((n_img, n_txt), -100.0, device=sim.device)
    ki, kt = min(k, n_txt), min(k, n_img)
    queries: List[Tuple[str, int]] = [("i", i) for i in range(n_img)] + [("t", t) for t in range(n_txt)]
    queries = queries[rank::world]
    it = progress(queries) if progress is not None else queries
    for kind, q in it:
        if kind == "i":
            cand = sim[q].topk(ki).indices
            img = images[q : q + 1].expand(len(cand), -1, -1, -1)
            s = _pair_scores(model, img, txt_states[cand], mask[cand], batch_size)
            scores_i2t[q, cand] = s
        else:
            cand = sim[:, q].topk(kt).indices
            s = _pair_scores(model, images[cand], txt_states[q : q + 1].expand(len(cand), -1, -1),
                             mask[q : q + 1].expand(len(cand), -1), batch_size)
            scores_t2i[cand, q] = s
        cost.itm_pairs += len(cand)
    if world > 1:
        scores_i2t, scores_t2i = _max_over_ranks(scores_i2t, images.device), _max_over_ranks(scores_t2i, images.device)
    cost.itm_seconds = time.perf_counter() - t0
    scores_i2t, scores_t2i, sim = scores_i2t.cpu(), scores_t2i.cpu(), sim.cpu()
    i2t = retrieval_metrics(scores_i2t, img2txt, txt2img)
    t2i = retrieval_metrics(scores_t2i, img2txt, txt2img)
    metrics = {k_: v for k_, v in i2t.items() if k_.startswith("txt_")}
    metrics.update({k_: v for k_, v in t2i.items() if k_.startswith("img_")})
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["r_sum"] = sum(metrics[x] for x in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"))
    itc = retrieval_metrics(sim, img2txt, txt2img)
    metrics["itc_r_mean"] = itc["r_mean"]
    return metrics, cost


def _max_over_ranks(t: Tensor, device) -> Tensor:
    import torch.distributed as dist

    x = t.to(device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.to(t.device)


def _pair_scores(model, images, text_states, mask, batch_size) -> Tensor:
    out = []
    for sl in _batches(images.shape[0], batch_size):
        out.append(itm_scores(model, images[sl], text_states[sl], mask[sl]))
    return torch.cat(out)
