"""``vlprune demo``: the main job on built-in data.

Until the scenes data, training and benchmark land, the demo runs the smallest honest end-to-end thing that
exists: it builds the ``small`` model, runs image-text pairs of synthetic pixels and token ids through it with
each available method, and prints token counts and the measured forward time.
"""

from __future__ import annotations

import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on built-in data and write a report")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="the smallest version (about 2 minutes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    import vlprune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    model = vlprune.build_model("small").eval()
    cfg = model.cfg
    B, L = 4, 16
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(1, cfg.text.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    rows = []
    for name in vlprune.list_methods():
        vlprune.attach(model, name)
        with torch.inference_mode():
            model(images, ids, mask)  # warm-up
            t0 = time.perf_counter()
            o = model(images, ids, mask)
            dt = time.perf_counter() - t0
        rows.append((name, o.image.num_tokens, dt * 1000))
    print(f"{'method':<12}{'image tokens':>14}{'forward ms':>12}")
    for name, tok, ms in rows:
        print(f"{name:<12}{tok:>14}{ms:>12.1f}")
    (out / "demo.txt").write_text("\n".join(f"{n}\t{t}\t{m:.1f}" for n, t, m in rows) + "\n")
    print(f"wrote {out / 'demo.txt'}")
    return 0
