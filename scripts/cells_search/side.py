"""The side-question search (docs/benchmark_scenes.md, "the side question"): train the demo's first stage, or a part of
it, on a finished demo's data with a position-embedding init and a head learning-rate multiplier, and print the
accuracy per question type after each part. Run after `make demo` (one thread per run, two runs at a time):

    .venv/bin/python scripts/cells_search/side.py f2 --pos sincos --whead-mult 10 --head-mult 10
    .venv/bin/python scripts/cells_search/side.py e4 --init0 runs/side_search/f2/all --wsteps 0 \
        --train vqa_train_side.json --steps 300 --head-mult 10

Part 1 (the warm-up, --wsteps, from scratch or --init0) trains on --wtrain, part 2 (--steps, from part 1) on --train.
Training files that select question types are written beside the data on first use: vqa_train_side.json (side
questions only), vqa_train_cs.json (colour and side), vqa_train_side3.json (every question, the side ones three times).
"""
import argparse
import json
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
from vlprune.demo.relevance import type_accuracy  # noqa: E402
from vlprune.demo.steps import eval_vqa  # noqa: E402
from vlprune.train import TrainConfig, train  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("name")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--pos", default="random", choices=("random", "sincos"), help="vision.pos_init of a model from scratch")
ap.add_argument("--wsteps", type=int, default=500)
ap.add_argument("--wlr", type=float, default=5e-4)
ap.add_argument("--whead-mult", type=float, default=1.0)
ap.add_argument("--wtrain", default="vqa_train_warmup.json")
ap.add_argument("--steps", type=int, default=400)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--head-mult", type=float, default=1.0)
ap.add_argument("--train", default="vqa_train.json")
ap.add_argument("--init0", default=None, help="start part 1 from this run instead of from scratch")
ap.add_argument("--data", default="runs/demo/data")
ap.add_argument("--out", default="runs/side_search")
a = ap.parse_args()

data, root = Path(a.data), Path(a.out) / a.name
root.mkdir(parents=True, exist_ok=True)
everything = json.loads((data / "vqa_train.json").read_text())
subsets = {"vqa_train_side.json": [q for q in everything if q["type"] == "side"],
           "vqa_train_cs.json": [q for q in everything if q["type"] in ("colour", "side")],
           "vqa_train_side3.json": everything + [q for q in everything if q["type"] == "side"] * 2}
for f in {a.wtrain, a.train} & set(subsets):
    if not (data / f).is_file():
        (data / f).write_text(json.dumps(subsets[f]))
model = json.loads((data.parent / "model.json").read_text())
model["vision"]["pos_init"] = a.pos
(root / "model.json").write_text(json.dumps(model))
test = json.loads((data / "vqa_test.json").read_text())


def cfg(train_file, steps, lr, init, head_mult):
    return TrainConfig(task="vqa", train=str(data / train_file), images=str(data), model=str(root / "model.json"),
                       init=None if init is None else str(init), tokenizer=None if init else str(data / "tokenizer"),
                       steps=steps, batch_size=32, lr=lr, warmup=-1, seed=a.seed, log_every=max(1, steps // 10),
                       ckpt_every=100000, lr_mult={"heads": head_mult} if head_mult != 1 else {}, threads=1,
                       progress=False, task_options={"answers": str(data / "answer_list.json")})


def per_type(run):
    ev = eval_vqa(run, None, data, "vqa_test.json", 64, False)
    return {t: round(x["acc"], 1) for t, x in sorted(type_accuracy(ev["scores"], [q["type"] for q in test]).items())}


t0, res = time.time(), {}
init = Path(a.init0) if a.init0 else None
if a.wsteps:
    train(cfg(a.wtrain, a.wsteps, a.wlr, init, a.whead_mult), root / "warm", overwrite=True)
    init, res["warm"] = root / "warm", per_type(root / "warm")
    print(a.name, "part 1", res["warm"], round(time.time() - t0), "s", flush=True)
train(cfg(a.train, a.steps, a.lr, init, a.head_mult), root / "all", overwrite=True)
res["all"] = per_type(root / "all")
print(a.name, "part 2", res["all"], round(time.time() - t0), "s", flush=True)
(root / "res.json").write_text(json.dumps({"args": vars(a), "res": res, "s": time.time() - t0}))
