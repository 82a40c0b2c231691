"""Recipe search on the cells scenes (docs/benchmark_scenes.md): generate data (cached per setting), train VQA (optionally after caption pre-training or from another run), evaluate per question type, unpruned and lowres at the cost of keep 0.35. Run: PYTHONPATH=scripts/cells_search python scripts/cells_search/exp.py NAME --naming colour --steps 500."""
import json, time, argparse, os
from pathlib import Path
import torch
torch.set_num_threads(1)
from vlprune.demo.steps import make_data, eval_vqa
from vlprune.demo.profiles import Scenes, SCENES_MODEL
from vlprune.config import load_preset, override, to_dict
from vlprune.train import TrainConfig, train
from vlprune.reduce.registry import ReduceConfig

ap = argparse.ArgumentParser()
ap.add_argument("name"); ap.add_argument("--images", type=int, default=6000)
ap.add_argument("--min", type=int, default=10); ap.add_argument("--max", type=int, default=13)
ap.add_argument("--grid", type=int, default=4); ap.add_argument("--types", default=None)
ap.add_argument("--steps", type=int, default=500); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--batch", type=int, default=32); ap.add_argument("--model", default="{}")
ap.add_argument("--ntest", type=int, default=800); ap.add_argument("--q", type=int, default=4)
ap.add_argument("--pretrain", type=int, default=0); ap.add_argument("--blind", action="store_true")
ap.add_argument("--naming", default="cs"); ap.add_argument("--init", default=None); ap.add_argument("--amp", type=float, default=38.0)
ap.add_argument("--warmup", type=int, default=-1); ap.add_argument("--only", default=None)
ap.add_argument("--pos-std", type=float, default=None, help="re-initialise the ViT position embeddings with this std")
a = ap.parse_args()
if a.pos_std is not None:  # harness-only: a larger random position code (the model's default is std 0.02)
    from vlprune.models import vit as _vit
    _init = _vit.ImageEmbeddings.__init__
    def _patched(self, cfg):
        _init(self, cfg); torch.nn.init.trunc_normal_(self.pos_embed, std=a.pos_std, a=-3 * a.pos_std, b=3 * a.pos_std)
    _vit.ImageEmbeddings.__init__ = _patched
import namings; namings.install(a.naming, a.amp)
root = Path(os.environ.get("CELLS_ROOT", "runs/cells_search")) / "runs" / a.name; root.mkdir(parents=True, exist_ok=True)
types = None if a.types is None else tuple(a.types.split(","))
dkey = f"d_{a.images}_{a.min}_{a.max}_{a.grid}_{a.types}_{a.q}_{a.naming}_{a.amp:g}"
data = Path(os.environ.get("CELLS_ROOT", "runs/cells_search")) / "data" / dkey
sc = Scenes(images=a.images, image_size=96, min_objects=a.min, max_objects=a.max, questions_per_image=a.q,
            question_types=types, family="cells", grid=a.grid)
t0 = time.time()
if not (data / "tokenizer").exists():  # the demo's own data step: scenes, the blind copy, one tokenizer
    s = make_data(data, sc, 96, 1000)
    print("card", json.dumps(s["card"]), flush=True)
    print("gen s", time.time() - t0, flush=True)
test = json.loads((data / "vqa_test.json").read_text())[: a.ntest]
(data / f"test_{a.name}.json").write_text(json.dumps(test))  # beside the images: eval resolves them from there
cfg_m = override(load_preset("small"), **{**SCENES_MODEL, **json.loads(a.model)})
(root / "model.json").write_text(json.dumps(to_dict(cfg_m)))
init = a.init
if a.pretrain:
    pc = TrainConfig(task="pretrain", train=str(data / "pretrain.json"), images=str(data), model=str(root / "model.json"),
                     tokenizer=str(data / "tokenizer"), steps=a.pretrain, batch_size=a.batch, lr=a.lr, seed=0,
                     log_every=max(1, a.pretrain // 10), ckpt_every=100000, threads=1)
    t1 = time.time(); train(pc, root / "pre", overwrite=True); print("pretrain s", time.time() - t1, flush=True)
    init = str(root / "pre")
trainf = "vqa_train_blind.json" if a.blind else "vqa_train.json"
if a.only:  # train on these question types only (the answer list stays the whole set's)
    keep_t = set(a.only.split(","))
    rows = [q for q in json.loads((data / trainf).read_text()) if q["type"] in keep_t]
    trainf = f"train_{a.name}.json"; (data / trainf).write_text(json.dumps(rows))
tc = TrainConfig(task="vqa", train=str(data / trainf), images=str(data), model=str(root / "model.json"), init=init,
                 tokenizer=None if init else str(data / "tokenizer"), steps=a.steps, batch_size=a.batch, lr=a.lr, warmup=a.warmup,
                 seed=0, log_every=max(1, a.steps // 10), ckpt_every=100000, threads=1,
                 task_options={"answers": str(data / "answer_list.json")})
t1 = time.time(); r = train(tc, root / "vqa", overwrite=True); dt = time.time() - t1
print("train s", dt, "per step", dt / a.steps, "first", r["first"], "last", r["last"], flush=True)
out = {"name": a.name, "args": vars(a), "train_s": dt}
g = cfg_m.vision.grid
for label, m in (("none", None), ("lowres", ReduceConfig("lowres", options={"image_size": max(1, round(0.35 ** 0.5 * g)) * cfg_m.vision.patch_size}))):
    if a.blind and m is not None:
        continue
    ev = eval_vqa(root / "vqa", m, data, f"test_{a.name}.json", 64, False)
    per = {}
    for q, sc_ in zip(test, ev["scores"]):
        per.setdefault(q["type"], []).append(sc_)
    out[label] = {"acc": round(ev["accuracy"], 1), **{t: round(100 * sum(v) / len(v), 1) for t, v in sorted(per.items())}}
    print(label, out[label], flush=True)
maj = {}
for t in sorted({q["type"] for q in test}):
    from collections import Counter
    tr = json.loads((data / "vqa_train.json").read_text())
    top = Counter(q["answer"][0] for q in tr if q["type"] == t).most_common(1)[0][0]
    qs = [q for q in test if q["type"] == t]
    maj[t] = round(100 * sum(q["answer"][0] == top for q in qs) / len(qs), 1)
out["majority"] = maj
print("majority", maj, flush=True)
(root / "result.json").write_text(json.dumps(out, indent=1))
