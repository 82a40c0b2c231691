"""``vlprune data scenes``: write the built-in procedural data set in the field's annotation formats.
``vlprune data shards``: convert a pre-training / retrieval-train annotation file into WebDataset tar shards.
``vlprune data manifest``: index existing WebDataset shards (samples and sha256 per shard) so training can read them."""

from __future__ import annotations

import shutil
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="built-in data sets")
    dsub = p.add_subparsers(dest="data_command", metavar="DATASET", required=True)
    s = dsub.add_parser("scenes", help="procedural scenes: captions, VQA, NLVR2, SNLI-VE, object masks")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--images", type=int, default=2000, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--image-size", type=int, default=64, help="image side in pixels (64 suits the small preset)")
    s.add_argument("--min-objects", type=int, default=3)
    s.add_argument("--max-objects", type=int, default=6)
    s.add_argument("--test-fraction", type=float, default=0.1, help="last fraction of images used as test split")
    s.add_argument("--questions", type=int, default=4, help="VQA questions per image")
    s.add_argument("--family", default="shapes", choices=("shapes", "cells"),
                   help="shapes: 3-6 freely placed objects; cells: the text-relevance benchmark (many small patterned "
                   "objects on a grid of cells; the demo's data; docs/data.md)")
    s.add_argument("--grid", type=int, default=4, help="cells family: cells per side (default 4)")
    s.add_argument("--question-types", default=None,
                   help="comma-separated VQA question kinds (default: all); shapes family: colour,shape,exists,count,"
                   "left; cells family: pattern,exists,count,left")
    s.add_argument("--patch-size", type=int, default=8, help="data card: the model's patch size in px (default 8)")
    s.add_argument("--keep", type=float, default=None,
                   help="data card: the keep rate of the objects-to-budget ratio (default 0.25); when given, a keep "
                   "that leaves fewer tokens than --max-objects is an error")
    s.add_argument("--object-scale", type=float, default=1.0, help="multiplies every object's radius, in [0.5, 2]")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.set_defaults(run=run)
    h = dsub.add_parser("shards", help="WebDataset tar shards from a pre-training (or retrieval-train) annotation file")
    h.add_argument("--from", dest="source", required=True, help="annotation JSON: [{\"image\", \"caption\"}, ...]")
    h.add_argument("--images", default=None, help="image root (default: the annotation file's folder)")
    h.add_argument("--out", required=True, help="output directory for 000000.tar, ... and manifest.json")
    h.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    h.add_argument("--workers", type=int, default=0, help="processes that decode and check images (default 0: this one)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    h.set_defaults(run=run_shards)
    x = dsub.add_parser("manifest", help="write manifest.json for existing WebDataset shards (to train from them)")
    x.add_argument("pattern", help="local shards, e.g. 'shards/{000000..000099}.tar'")
    x.add_argument("--overwrite", action="store_true", help="replace an existing manifest.json")
    x.set_defaults(run=run_manifest)
    from .prepare import add_subparser

    add_subparser(dsub)


def run(args) -> int:
    from vlprune.errors import CLIError
    from vlprune.data.scenes import generate
    from vlprune.data.scenes_card import card_lines

    from vlprune.rundir import check_overwrite, write_marker

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise CLIError(f"output directory {out} exists and is not empty (use --overwrite to replace it)")
        check_overwrite(out, "data")  # only scenes data that vlprune wrote is deleted
        shutil.rmtree(out)
    t0 = time.perf_counter()
    write_marker(out, "data")
    s = generate(out, images=args.images, seed=args.seed, image_size=args.image_size, min_objects=args.min_objects,
                 max_objects=args.max_objects, test_fraction=args.test_fraction, questions_per_image=args.questions,
                 object_scale=args.object_scale, family=args.family, grid=args.grid, patch_size=args.patch_size,
                 card_keep=args.keep,
                 question_types=None if args.question_types is None else tuple(
                     t.strip() for t in args.question_types.split(",") if t.strip()))
    dt = time.perf_counter() - t0
    print(f"wrote {s['images']} images ({s['train_images']} train, {s['test_images']} test) to {out} in {dt:.1f} s")
    print("  " + ", ".join(f"{k}: {v}" for k, v in s.items()
                           if k not in ("out", "images", "train_images", "test_images", "card")))
    print(f"data card ({args.family} family; also in {out / 'card.json'}):")
    for line in card_lines(s["card"]):
        print("  " + line)
    return 0


def run_shards(args) -> int:
    import sys

    from vlprune.data.formats import load_annotations
    from vlprune.data.shards import MANIFEST, write_shards
    from vlprune.errors import CLIError

    if args.shard_size < 1:
        raise CLIError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    src = Path(args.source)
    if not src.is_file():
        raise CLIError(f"--from: annotation file not found: {src}")
    images = Path(args.images) if args.images else src.parent
    if not images.is_dir():
        raise CLIError(f"--images: image root directory not found: {images}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise CLIError(f"output directory {out} exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    entries = load_annotations(src, "pretrain")

    def bad(i: int, image: str, error: str) -> None:
        print(f"skipping entry {i} ({image}): {error}", file=sys.stderr)

    t0 = time.perf_counter()
    m = write_shards(entries, images, out, args.shard_size, source=str(src), progress=not args.quiet, on_bad=bad,
                     workers=args.workers)
    dt = time.perf_counter() - t0
    n = len(m["shards"])
    print(f"wrote {m['samples']} samples in {n} shard(s) to {out} in {dt:.1f} s; skipped {m['skipped']} bad image(s) "
          f"(listed in {out / MANIFEST})")
    print(f"train with: --train {str(out / m['pattern'])!r}")
    return 0


def run_manifest(args) -> int:
    from vlprune.data.shard_dataset import index_shards
    from vlprune.data.shards import MANIFEST

    from vlprune.errors import CLIError

    where = Path(args.pattern).parent / MANIFEST
    if where.exists() and not args.overwrite:
        raise CLIError(f"{where} exists (use --overwrite to replace it; a manifest from `vlprune data shards` also "
                       "lists the skipped entries)")
    m = index_shards(args.pattern, progress=not args.quiet)
    print(f"indexed {m['samples']} samples in {len(m['shards'])} shard(s); wrote {where}")
    return 0
