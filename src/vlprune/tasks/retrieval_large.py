"""Two-stage retrieval over large galleries in bounded memory (the protocol of ``tasks.retrieval``, at scale).

``tasks.retrieval.evaluate_retrieval`` holds every image tensor, every caption's hidden states and the full
``n_images x n_captions`` score matrices: right for a 1k-5k test split, impossible for a gallery of a million
images. Here:

1. Stage 1 (text-free): images are loaded and encoded ``batch_size`` at a time (unpruned when the method is
   text-guided, as in ``tasks.retrieval``); only their ITC embeddings are kept: ``n x D`` floats (100,000
   images x 256 dims = 98 MiB in fp32). Under DDP each rank encodes every ``world``-th chunk and the embeddings
   are gathered.
2. Search: the top ``k`` keys of every query by dot product, with a chunked top-k (``chunked_topk``: at most
   ``query_chunk x (chunk + k)`` scores exist at any time, never the full matrix) or, when installed and asked
   for, faiss's exact inner-product index (``pip install "vlprune[faiss]"``).
3. Stage 2 (text-guided): each query's ``k`` candidates are re-scored with the ITM head on text-guided image
   tokens; candidate images are loaded again on demand and caption states are recomputed for the candidates, so
   nothing of size ``n_images x ...`` beyond the embeddings is held.

Recall@K is computed from each query's rank exactly as ``retrieval_metrics`` ranks the full matrix in which pairs
outside the top ``k`` score -100 (ties: the lower index first), so on a gallery that fits in memory both paths
give the same metrics.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from .metrics import recall_from_ranks
from .retrieval import RetrievalCost, is_text_guided, itm_scores, reducers_disabled

Loader = Callable[[Sequence[int]], Tensor]  # image indices -> (len, 3, S, S)


def chunked_topk(queries: Tensor, keys: Tensor, k: int, chunk: int = 16384, query_chunk: int = 1024) -> Tuple[Tensor, Tensor]:
    """Top ``k`` keys per query by dot product: queries (Q, D), keys (N, D) -> (values (Q, k), indices (Q, k)),
    sorted by decreasing score. Equals ``(queries @ keys.T).topk(k)`` (up to the order of exact ties) without
    the (Q, N) matrix: scores exist for ``query_chunk`` queries x ``chunk`` keys at a time."""
    if k < 1 or chunk < 1 or query_chunk < 1:
        raise ValueError(f"k, chunk and query_chunk must be >= 1, got {k}, {chunk}, {query_chunk}")
    n = keys.shape[0]
    k = min(k, n)
    vals, idx = [], []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk]
        best_v = q.new_empty((q.shape[0], 0))
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for ks in range(0, n, chunk):
            s = q @ keys[ks:ks + chunk].t()  # (q, c)
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            v, j = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + ks], 1).gather(1, j)
            best_v = v
        vals.append(best_v)
        idx.append(best_i)
    return torch.cat(vals), torch.cat(idx)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def search(queries: Tensor, keys: Tensor, k: int, chunk: int = 16384, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Top-k by inner product with ``backend`` "torch" (``chunked_topk``), "faiss" (IndexFlatIP, exact) or
    "auto" (faiss when installed)."""
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"search backend must be auto, torch or faiss, got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ImportError("the faiss backend needs faiss: pip install \"vlprune[faiss]\"")
    if backend == "torch" or not faiss_available():
        return chunked_topk(queries, keys, k, chunk)
    import faiss

    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys.float().cpu().contiguous().numpy())
    v, i = index.search(queries.float().cpu().contiguous().numpy(), min(k, keys.shape[0]))
    return torch.from_numpy(v).to(queries.device), torch.from_numpy(i).long().to(queries.device)


@torch.inference_mode()
def image_features(model: nn.Module, n: int, load: Loader, batch_size: int, device, rank: int = 0, world: int = 1,
                   progress: bool = False) -> Tensor:
    """Text-free ITC embeddings of images 0..n-1 (n, D), float32 on ``device``, encoded ``batch_size`` at a time."""
    from tqdm import tqdm

    from ..distributed import gather

    ctx = reducers_disabled(model) if is_text_guided(model) else contextlib.nullcontext()
    starts = list(range(0, n, batch_size))
    rows = [list(range(s, min(n, s + batch_size))) for s in starts[rank::world]]  # rank r: chunks r, r + world, ...
    out = torch.empty(sum(map(len, rows)), model.cfg.embed_dim, device=device)
    pos = 0
    with ctx:
        for r in tqdm(rows, disable=not (progress and rank == 0), desc="gallery", unit="batch", dynamic_ncols=True):
            out[pos:pos + len(r)] = model.image_embed(model.encode_image(load(r).to(device))).float()
            pos += len(r)
    if world == 1:
        return out
    order = torch.tensor([i for q in range(world) for s in starts[q::world] for i in range(s, min(n, s + batch_size))],
                         device=device)
    full = torch.empty(n, out.shape[1], device=device)
    full[order] = gather(out)  # gathered in rank order
    return full


@torch.inference_mode()
def text_features(model: nn.Module, ids: Tensor, mask: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model.text_embed(model.encode_text(ids[s:s + batch_size], mask[s:s + batch_size])).float()
                      for s in range(0, ids.shape[0], batch_size)])


def rank_in_full_matrix(cand: Tensor, scores: Tensor, target: int) -> int:
    """The 0-based rank of key ``target`` in a row where ``cand`` score ``scores`` and every other key -100, sorted
    by decreasing score with ties to the lower index (as ``retrieval_metrics`` sorts)."""
    hit = (cand == target).nonzero()
    if hit.numel():
        s = scores[hit[0, 0]]
        return int(((scores > s) | ((scores == s) & (cand < target))).sum())
    return cand.numel() + target - int((cand < target).sum())


def _rerank(pairs: Callable[[int, Tensor], Tensor], cand: Tensor, targets: Sequence[Sequence[int]],
            queries: Sequence[int], progress) -> Tuple[Dict[int, int], int]:
    ranks, n_pairs = {}, 0
    for q in (progress(queries) if progress is not None else queries):
        c = cand[q]
        s = pairs(q, c)
        ranks[q] = min(rank_in_full_matrix(c.cpu(), s.cpu(), t) for t in targets[q])
        n_pairs += c.numel()
    return ranks, n_pairs


@torch.inference_mode()
def evaluate_large_gallery(model: nn.Module, n_images: int, load: Loader, ids: Tensor, mask: Tensor,
                           img2txt: Sequence[Sequence[int]], txt2img: Sequence[int], k: int = 128,
                           batch_size: int = 64, chunk: int = 16384, backend: str = "auto", progress=None,
                           rank: int = 0, world: int = 1) -> Tuple[Dict[str, float], RetrievalCost]:
    """Recall@K both ways over ``n_images`` images fetched by ``load`` (see the module docstring); ids/mask
    (n_txt, L) on the model's device. Under DDP every rank holds the captions and can load every image."""
    if getattr(model.cfg, "arch", None) != "albef":
        raise ValueError("two-stage retrieval needs a two-stream model (arch='albef') with ITC and ITM heads")
    if k < 1:
        raise ValueError(f"k (ITM re-ranking candidates) must be >= 1, got {k}")
    model.eval()
    device = ids.device
    cost = RetrievalCost(stage1_unpruned=is_text_guided(model))
    t0 = time.perf_counter()
    img_e = image_features(model, n_images, load, batch_size, device, rank, world)
    txt_e = text_features(model, ids, mask, batch_size)
    _, t2i_cand = search(txt_e, img_e, k, chunk, backend)  # (n_txt, k) image indices
    _, i2t_cand = search(img_e, txt_e, k, chunk, backend)  # (n_img, k) caption indices
    cost.itc_seconds = time.perf_counter() - t0
    cost.extra["gallery_embedding_mib"] = img_e.numel() * img_e.element_size() / 2**20
    t0 = time.perf_counter()

    def t2i_pairs(q: int, c: Tensor) -> Tensor:
        states = model.encode_text(ids[q:q + 1], mask[q:q + 1])
        out = []
        for s in range(0, c.numel(), batch_size):
            cc = c[s:s + batch_size]
            out.append(itm_scores(model, load(cc.tolist()).to(device), states.expand(len(cc), -1, -1),
                                  mask[q:q + 1].expand(len(cc), -1)))
        return torch.cat(out)

    def i2t_pairs(q: int, c: Tensor) -> Tensor:
        image = load([q]).to(device)
        out = []
        for s in range(0, c.numel(), batch_size):
            cc = c[s:s + batch_size]
            states = model.encode_text(ids[cc], mask[cc])
            out.append(itm_scores(model, image.expand(len(cc), -1, -1, -1), states, mask[cc]))
        return torch.cat(out)

    t_ranks, n1 = _rerank(t2i_pairs, t2i_cand, [[t] for t in txt2img], list(range(len(txt2img)))[rank::world], progress)
    i_ranks, n2 = _rerank(i2t_pairs, i2t_cand, img2txt, list(range(n_images))[rank::world], progress)
    if world > 1:
        from .evaluation import _gather

        t_ranks = {q: r for part in _gather(t_ranks, world) for q, r in part.items()}
        i_ranks = {q: r for part in _gather(i_ranks, world) for q, r in part.items()}
    cost.itm_pairs = n1 + n2
    cost.itm_seconds = time.perf_counter() - t0
    return recall_from_ranks(list(i_ranks.values()), list(t_ranks.values())), cost
