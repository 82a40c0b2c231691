"""Warm-up robustness (docs/benchmark_scenes.md, 2026-12-06): train the demo's warm-up stage (colour questions only)
with a given seed / steps / lr on a finished demo's data and print the accuracy per question type. Run after
`make demo`: .venv/bin/python scripts/cells_search/warmup.py s0 --seed 0 --lr 5e-4"""
import json, time, argparse
from pathlib import Path
import torch
torch.set_num_threads(1)
from vlprune.demo.relevance import type_accuracy
from vlprune.demo.steps import eval_vqa
from vlprune.train import TrainConfig, train
ap = argparse.ArgumentParser(); ap.add_argument("name"); ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--steps", type=int, default=500); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--min-lr", type=float, default=0.1); ap.add_argument("--warmup", type=int, default=-1)
ap.add_argument("--data", default="runs/demo/data"); ap.add_argument("--init", default=None)
ap.add_argument("--train", default="vqa_train_warmup.json"); ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--wd", type=float, default=0.02); ap.add_argument("--out", default="runs/warmup_search")
a = ap.parse_args()
data = Path(a.data); root = Path(a.out) / a.name
test = json.loads((data / "vqa_test.json").read_text())
tc = TrainConfig(task="vqa", train=str(data / a.train), images=str(data), model=str(data.parent / "model.json"),
                 init=a.init, tokenizer=None if a.init else str(data / "tokenizer"), steps=a.steps, batch_size=a.batch, lr=a.lr,
                 warmup=a.warmup, min_lr_ratio=a.min_lr, weight_decay=a.wd, seed=a.seed, log_every=max(1, a.steps // 10),
                 ckpt_every=100000, threads=1, progress=False, task_options={"answers": str(data / "answer_list.json")})
t1 = time.time(); r = train(tc, root, overwrite=True); dt = time.time() - t1
ev = eval_vqa(root, None, data, "vqa_test.json", 64, False)
res = {t: round(a["acc"], 1) for t, a in sorted(type_accuracy(ev["scores"], [q["type"] for q in test]).items())}
print(a.name, vars(a), "train_s", round(dt), "loss", r["first"], r["last"], res, flush=True)
(root / "res.json").write_text(json.dumps({"args": vars(a), "res": res, "train_s": dt}))
