"""Measure large-gallery retrieval in bounded memory (``vlprune.tasks.retrieval_large``) on synthetic data.

    python scripts/large_gallery.py --gallery 100000 --queries 5000 --dim 256 --k 128 --threads 1

What it measures, each with wall time and the peak resident memory (VmHWM, reset before each part through
/proc/self/clear_refs, reported as the increase over the resident memory before the part):

1. search: the top ``k`` of ``--queries`` random unit query embeddings over ``--gallery`` random unit image
   embeddings (``--dim`` dims, fp32; ALBEF-base's ITC dimension is 256), with the chunked torch top-k
   (``--chunk`` keys x ``--query-chunk`` queries of scores at a time) and with faiss's exact IndexFlatIP when it
   is installed. The full (queries x gallery) score matrix that an in-memory evaluation would build is reported
   by its size only (``--full`` also times it).
2. encode: stage 1 from pixels: ``--encode`` synthetic images (``--model`` preset, default small) through the
   text-free image encoder, loaded and encoded ``--batch-size`` at a time; images/s.
3. rerank: stage 2: the ITM re-ranking of ``k`` candidates for ``--rerank`` caption queries (text-guided TRIPS
   tokens), seconds per query.

Random weights and random data: the figures are costs, not accuracies. Report them with the date, threads and
load average this script prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time

import torch

import vlprune
from vlprune.tasks.retrieval import itm_scores
from vlprune.tasks.retrieval_large import chunked_topk, faiss_available, image_features, search


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


class Peak:
    """Peak resident memory of a block, over the resident memory at its start (MiB)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass
        self.base = rss_kib("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.mib = (rss_kib("VmHWM") - self.base) / 1024


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--query-chunk", type=int, default=1024)
    ap.add_argument("--full", action="store_true", help="also time the full score matrix + topk (needs its memory)")
    ap.add_argument("--model", default="small")
    ap.add_argument("--encode", type=int, default=2000, help="images for the stage-1 encoding rate (0: skip)")
    ap.add_argument("--rerank", type=int, default=4, help="caption queries for the stage-2 rate (0: skip)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
           "loadavg_start": open("/proc/loadavg").read().split()[:3], "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "args": vars(args)}
    with Peak() as p:
        gallery, queries = unit(args.gallery, args.dim, 0), unit(args.queries, args.dim, 1)
    res["embeddings_mib"] = round(p.mib, 1)
    with Peak() as p:
        v, i = chunked_topk(queries, gallery, args.k, args.chunk, args.query_chunk)
    res["search_torch"] = {"seconds": round(p.seconds, 2), "peak_mib": round(p.mib, 1),
                           "ms_per_query": round(1000 * p.seconds / args.queries, 3),
                           "working_set_mib": round(args.query_chunk * (args.chunk + args.k) * 4 / 2**20, 1)}
    if faiss_available():
        with Peak() as p:
            fi = search(queries, gallery, args.k, backend="faiss")[1]
        res["search_faiss"] = {"seconds": round(p.seconds, 2), "peak_mib": round(p.mib, 1),
                               "same_top1": float((fi[:, 0] == i[:, 0]).float().mean())}
    res["full_matrix_mib"] = round(args.queries * args.gallery * 4 / 2**20, 1)
    if args.full:
        with Peak() as p:
            fv, fidx = (queries @ gallery.t()).topk(args.k, dim=1)
        res["search_full"] = {"seconds": round(p.seconds, 2), "peak_mib": round(p.mib, 1),
                              "same": bool(torch.equal(fidx, i))}
    del gallery, queries
    torch.manual_seed(0)
    model = vlprune.build_model(args.model, method=vlprune.ReduceConfig("trips")).eval()
    S = model.cfg.vision.image_size
    if args.encode:
        def load(rows):
            g = torch.Generator().manual_seed(rows[0])
            return torch.randn(len(rows), 3, S, S, generator=g)

        with Peak() as p:
            feats = image_features(model, args.encode, load, args.batch_size, torch.device("cpu"))
        res["encode"] = {"model": args.model, "images": args.encode, "seconds": round(p.seconds, 2),
                         "images_per_s": round(args.encode / p.seconds, 1), "peak_mib": round(p.mib, 1),
                         "features": list(feats.shape)}
    if args.rerank:
        L = model.cfg.text.max_len
        ids = torch.randint(5, model.cfg.text.vocab_size, (1, L))
        mask = torch.ones(1, L, dtype=torch.long)
        with Peak() as p, torch.inference_mode():
            for q in range(args.rerank):
                states = model.encode_text(ids, mask)
                for s in range(0, args.k, args.batch_size):
                    n = min(args.batch_size, args.k - s)
                    images = torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(q * 1000 + s))
                    itm_scores(model, images, states.expand(n, -1, -1), mask.expand(n, -1))
        res["rerank"] = {"model": args.model, "method": "trips", "k": args.k, "queries": args.rerank,
                         "s_per_query": round(p.seconds / args.rerank, 3), "peak_mib": round(p.mib, 1)}
    res["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
