"""Run by tests/test_multinode.py under ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d``: one process
per "node". It joins the process group from torchrun's environment (gloo), runs the ITC step of
tests/test_distributed.py on its slice of the batch and saves the result; with a shard pattern it then trains 2
steps on the shards twice, uninterrupted and killed after step 1 then resumed, recording the sample
keys of every micro-batch this rank saw.

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \
        --rdzv-endpoint 127.0.0.1:29400 --rdzv-id job tests/multinode_worker.py OUT [SHARD_PATTERN MODEL_JSON]

``elastic OUT MODEL_JSON TRAIN_JSON`` (under ``torchrun --standalone --nproc-per-node 2 --max-restarts 1``): trains
4 steps uninterrupted into OUT/full (skipped once done), then the same run into OUT/part, resuming from its
newest checkpoint when there is one. In the group's first attempt, the rank ``VLPRUNE_KILL_RANK`` dies by
``os._exit`` right after optimiser step ``VLPRUNE_KILL_STEP`` (as a crashed or OOM-killed process would, without
any clean-up); torchrun then stops the other rank and starts the group again. Each attempt of each rank writes
OUT/elastic-RANK-ATTEMPT.json.
"""

import json
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vlprune  # noqa: E402
import vlprune.train as tr  # noqa: E402
from test_distributed import B, _run  # noqa: E402
from vlprune.tasks.base import StepModule  # noqa: E402


def elastic(out: str, model_json: str, train_json: str) -> None:
    from pathlib import Path

    from vlprune.checkpoint import has_checkpoint, load_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # one group for both runs (train() then leaves it alone)
    rank, attempt = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    kill_rank, kill_step = int(os.environ["VLPRUNE_KILL_RANK"]), int(os.environ["VLPRUNE_KILL_STEP"])
    cfg = tr.TrainConfig(model=model_json, train=train_json, steps=4, batch_size=2, log_every=1, ckpt_every=1,
                         seed=4, threads=1)
    full, part = Path(out) / "full", Path(out) / "part"
    if not (full / "model" / "config.json").is_file():
        tr.train(cfg, full)

    def die(step, record):
        if attempt == 0 and rank == kill_rank and step == kill_step:
            os._exit(17)

    resume = has_checkpoint(part)
    start = load_checkpoint(part)["step"] if resume else 0
    res = tr.train(cfg, part, resume=resume, callback=die)
    with open(os.path.join(out, f"elastic-{rank}-{attempt}.json"), "w") as f:
        json.dump({"rank": rank, "attempt": attempt, "resumed_from": start, "steps": res["steps"]}, f)
    dist.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "elastic":
        return elastic(*sys.argv[2:5])
    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    state = _run(vlprune.build_model("tiny"), slice(rank * B, (rank + 1) * B), ddp=True)
    torch.save(state, os.path.join(out, f"momentum{rank}.pt"))
    info = {"rank": rank, "world": dist.get_world_size(), "node": int(os.environ["GROUP_RANK"]),
            "nodes": int(os.environ["GROUP_WORLD_SIZE"]), "local_rank": int(os.environ["LOCAL_RANK"]), "keys": []}
    if len(sys.argv) > 2:
        seen = info["keys"]

        class Recording(StepModule):
            def forward(self, batch, ctx):
                seen.append(list(batch["key"]))
                return super().forward(batch, ctx)

        tr.StepModule = Recording
        cfg = tr.TrainConfig(model=sys.argv[3], train=sys.argv[2], steps=3, batch_size=3, log_every=1, seed=4,
                             shuffle_buffer=4)
        info["steps"] = tr.train(cfg, os.path.join(out, "run"))["steps"]
        info["full_keys"], info["keys"] = list(seen), []
        seen = info["keys"]

        def kill(step, record):  # every rank stops after step 1, as when the job is preempted
            if step == 1:
                signal.raise_signal(signal.SIGTERM)

        info["part_steps"] = tr.train(cfg, os.path.join(out, "part"), callback=kill)["steps"]
        info["rest_steps"] = tr.train(cfg, os.path.join(out, "part"), resume=True)["steps"]
    from test_retrieval_large import gallery_case  # noqa: E402

    from vlprune.tasks.retrieval_large import evaluate_large_gallery

    model, images, ids, mask, img2txt, txt2img = gallery_case()
    info["gallery"] = evaluate_large_gallery(model, images.shape[0], lambda rows: images[list(rows)], ids, mask,
                                             img2txt, txt2img, k=4, batch_size=5, chunk=4, backend="torch",
                                             rank=rank, world=2)[0]
    with open(os.path.join(out, f"node{rank}.json"), "w") as f:
        json.dump(info, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
