"""``vlprune data scenes``: write the built-in procedural data set in the field's annotation formats."""

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
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.set_defaults(run=run)


def run(args) -> int:
    from vlprune.errors import CLIError
    from vlprune.data.scenes import generate

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise CLIError(f"output directory {out} exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    t0 = time.perf_counter()
    s = generate(out, images=args.images, seed=args.seed, image_size=args.image_size, min_objects=args.min_objects,
                 max_objects=args.max_objects, test_fraction=args.test_fraction, questions_per_image=args.questions)
    dt = time.perf_counter() - t0
    print(f"wrote {s['images']} images ({s['train_images']} train, {s['test_images']} test) to {out} in {dt:.1f} s")
    print("  " + ", ".join(f"{k}: {v}" for k, v in s.items() if k not in ("out", "images", "train_images", "test_images")))
    return 0
