"""Samples per second of the training data path: tar shards (``ShardDataset``) against the JSON loader
(``CaptionDataset`` + ``ResumableSampler``), each through a DataLoader with 0, 1 and 2 worker processes.

    python scripts/shard_throughput.py --images 1000 --workers 0,1,2 --rounds 3 --threads 1

It writes the built-in scenes data (``--images`` images of ``--image-size`` px; two captions each), converts
pretrain.json into shards of ``--shard-size`` samples, then reads one epoch of each loader per round: decode,
resize, normalise, tokenize and collate batches of ``--batch-size``, as the trainer does (no model). Loaders are
interleaved within a round (so that load on a shared machine hits them alike) and the median over rounds is
reported, with the date, threads and load average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vlprune.config import load_preset
from vlprune.data.datasets import CaptionDataset, Collate, ResumableSampler
from vlprune.data.formats import load_annotations
from vlprune.data.images import ImageLoader
from vlprune.data.scenes import generate
from vlprune.data.shard_dataset import ShardDataset
from vlprune.data.shards import write_shards
from vlprune.data.tokenizer import TextTokenizer


def epoch_rate(make_loader) -> float:
    dl = make_loader()
    t0, n = time.perf_counter(), 0
    for batch in dl:
        n += batch["size"]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--model", default="small", help="preset whose image size and normalisation the loaders use")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--buffer", type=int, default=1000)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    cfg = load_preset(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        generate(root / "scenes", images=args.images, seed=0, image_size=args.image_size)
        entries = load_annotations(root / "scenes" / "pretrain.json", "pretrain")
        t0 = time.perf_counter()
        m = write_shards(entries, root / "scenes", root / "shards", args.shard_size)
        write_s = time.perf_counter() - t0
        pattern = str(root / "shards" / m["pattern"])
        tok = TextTokenizer.train([e["caption"] for e in entries], cfg.text.vocab_size)
        collate = Collate(tok, cfg.text.max_len)
        bs = args.batch_size

        def json_loader(w):
            ds = CaptionDataset(entries, ImageLoader.for_model(cfg.vision, root / "scenes"))
            sampler = ResumableSampler(ds, 1, 0, shuffle=True, seed=0)
            return lambda: DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=True, collate_fn=collate,
                                      num_workers=w)

        def shard_loader(w):
            ds = ShardDataset(pattern, ImageLoader.for_model(cfg.vision, None), bs, seed=0, buffer=args.buffer)
            return lambda: DataLoader(ds, batch_size=bs, drop_last=True, collate_fn=collate, num_workers=w)

        loaders = {f"{kind} workers={w}": make(w) for w in workers for kind, make in
                   (("json", json_loader), ("shards", shard_loader))}
        rates = {name: [] for name in loaders}
        load = [open("/proc/loadavg").read().split()[:3]]
        for _ in range(args.rounds):
            for name, make in loaders.items():
                rates[name].append(epoch_rate(make))
        load.append(open("/proc/loadavg").read().split()[:3])
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
           "loadavg_start_end": load, "samples": m["samples"], "shards": len(m["shards"]),
           "shard_write_s": round(write_s, 2), "image_size": args.image_size, "model": args.model,
           "batch_size": bs, "rounds": args.rounds,
           "samples_per_s_median": {k: round(statistics.median(v), 1) for k, v in rates.items()},
           "samples_per_s_all": {k: [round(x, 1) for x in v] for k, v in rates.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
