"""Two CPU processes (gloo) against one process on the concatenated batch.

What is compared: the ITC objective with momentum distillation and queues (negatives gathered across ranks with
gradient, queues filled from all ranks), two optimiser steps, parameters and queues. ITM and MLM are left out of
the equality on purpose: ITM draws its hard negatives within each rank's local batch (as ALBEF does) and MLM
masks come from per-rank generators, so with them a DDP step equals the single-process step only in
distribution, not number for number. The same spawn then runs the real trainer (all losses) for 2 steps under
DDP and checks that rank 0 wrote the run.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vlprune
from vlprune.data.tokenizer import TextTokenizer
from vlprune.distributed import wrap_ddp
from vlprune.tasks.base import StepContext, StepModule
from vlprune.tasks.pretrain import PretrainTask

B = 3  # per rank
STEPS = 2
# momentum encoders + queues (keys: gathered momentum features), and plain in-batch ITC (keys: online features
# gathered with gradient)
VARIANTS = {"momentum": {}, "inbatch": {"use_momentum": False, "queue_size": 0}}


def _batch(cfg, step):
    g = torch.Generator().manual_seed(100 + step)
    n = 2 * B
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    lengths = torch.randint(3, 9, (n,), generator=g)
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    ids = torch.randint(5, cfg.text.vocab_size, (n, 10), generator=g).masked_fill(mask == 0, 0)
    ids[:, 0] = 2
    image_id = torch.tensor([0, 1, 2, 3, 1, 5]) + 10 * step  # samples 1 and 4 (on different ranks) share an image
    return {"images": images, "ids": ids, "mask": mask, "image_id": image_id, "size": n}


def _run(model, rows, ddp: bool):
    tok = TextTokenizer.train(["a red circle"], 20)
    task = PretrainTask(itc=1.0, itm=0.0, mlm=0.0, alpha=0.4)
    module = StepModule(model, task)
    if ddp:
        module = wrap_ddp(module, torch.device("cpu"))  # no buffer broadcast: each rank fills its own queues
    # SGD, not Adam: Adam turns float noise in gradients that are zero in exact arithmetic (the key bias of an
    # attention) into full-size steps of random sign, which no tolerance could compare
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(STEPS):
        batch = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in _batch(model.cfg, step).items()}
        ctx = StepContext(torch.Generator().manual_seed(step), tok, step, STEPS, 0)
        module(batch, ctx)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _join_gloo(rank: int, world: int, port: int) -> None:
    """This process joins a local gloo group of ``world`` processes as ``rank``, with one torch thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank, world, port, out):
    _join_gloo(rank, world, port)
    for name, kw in VARIANTS.items():
        torch.manual_seed(0)
        state = _run(vlprune.build_model("tiny", **kw), slice(rank * B, (rank + 1) * B), ddp=True)
        torch.save(state, os.path.join(out, f"{name}{rank}.pt"))
    from vlprune.train import TrainConfig, train

    cfg = TrainConfig(model="tiny", steps=2, batch_size=4, log_every=1, scenes_images=20, seed=0)
    res = train(cfg, os.path.join(out, "run"))
    with open(os.path.join(out, f"res{rank}.json"), "w") as f:
        json.dump({"steps": res["steps"], "last": res["last"]}, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_step_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, kw in VARIANTS.items():
        torch.manual_seed(0)
        single = _run(vlprune.build_model("tiny", **kw), slice(0, 2 * B), ddp=False)
        for r in (0, 1):  # both ranks hold the single-process parameters and queues
            ddp = torch.load(tmp_path / f"{name}{r}.pt", weights_only=True)
            assert ddp.keys() == single.keys()
            for k in single:
                torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=f"{name} rank {r}: {k}")
        if "queue_ptr" in single:
            assert int(single["queue_ptr"]) == 2 * B * STEPS % single["image_queue"].shape[1]
    # the trainer under DDP: both ranks ran, rank 0 wrote metrics and the checkpoint
    res = [json.loads((tmp_path / f"res{r}.json").read_text()) for r in (0, 1)]
    assert res[0]["steps"] == res[1]["steps"] == 2 and res[0]["last"]["loss"] == pytest.approx(res[1]["last"]["loss"])
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "checkpoint-2" and (run / "model" / "config.json").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def _fsdp_worker(rank, world, port, out):
    from vlprune.distributed import average_gradients, wrap_fsdp

    _join_gloo(rank, world, port)
    for name, kw in VARIANTS.items():
        torch.manual_seed(0)
        model = vlprune.build_model("tiny", **kw)
        tok = TextTokenizer.train(["a red circle"], 20)
        module = StepModule(model, PretrainTask(itc=1.0, itm=0.0, mlm=0.0, alpha=0.4))
        whole = wrap_fsdp(module, torch.device("cpu"))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        rows = slice(rank * B, (rank + 1) * B)
        for step in range(STEPS):
            batch = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in _batch(model.cfg, step).items()}
            module(batch, StepContext(torch.Generator().manual_seed(step), tok, step, STEPS, 0))["loss"].backward()
            average_gradients(whole)
            opt.step()
            opt.zero_grad()
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in model.state_dict().items()}
        torch.save({"state": state, "whole": [tuple(p.shape) for p in whole],
                    "sharded": sum(hasattr(p, "device_mesh") for p in model.parameters())},
                   os.path.join(out, f"fsdp-{name}{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes start and shard the model: ~30 s on 2 busy cores
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp_two_process_steps_equal_single_process(tmp_path):
    """FSDP2 (fully_shard per transformer block, on gloo and CPU): two steps on two ranks give the parameters and
    queues of one process on the concatenated batch, as DDP does, with momentum encoders and queues and without
    (docs/reproduce.md, "FSDP")."""
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, kw in VARIANTS.items():
        torch.manual_seed(0)
        single = _run(vlprune.build_model("tiny", **kw), slice(0, 2 * B), ddp=False)
        for r in (0, 1):
            got = torch.load(tmp_path / f"fsdp-{name}{r}.pt", weights_only=True)
            assert got["whole"] == [()] and got["sharded"] > 20  # only ALBEF's temperature stays whole
            assert got["state"].keys() == single.keys()
            for k in single:
                torch.testing.assert_close(got["state"][k], single[k], rtol=1e-4, atol=1e-5,
                                           msg=f"{name} rank {r}: {k}")
