"""Two "nodes" x one process on this machine, joined by torchrun's c10d rendezvous on localhost (gloo): the DDP
step equals one process on the concatenated batch (as tests/test_distributed.py checks for two local
processes), and training on tar shards gives each node its own, disjoint share of the epoch, in the order the
shard reader defines for that rank; a run killed on both nodes after step 1 and resumed trains on the same
micro-batches on every rank and ends bitwise equal to the uninterrupted run; large-gallery retrieval split over
the two nodes gives the metrics of one process. Elastic restart: under ``torchrun --max-restarts 1`` one of two
ranks dies mid-run, torchrun restarts the group, the run resumes from its newest checkpoint and ends bitwise equal
to the uninterrupted run. Opt-in: ``pytest -m slow tests/test_multinode.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import vlprune
from vlprune.checkpoint import load_checkpoint
from test_distributed import B, _run
from test_shards import MODEL
from vlprune.data.formats import load_annotations
from vlprune.data.images import ImageLoader
from vlprune.data.scenes import generate
from vlprune.data.shard_dataset import ShardDataset
from vlprune.data.shards import write_shards

WORKER = Path(__file__).with_name("multinode_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # four Python processes start (two agents, two workers): ~40 s on 2 busy cores
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_nodes_c10d_step_equals_single_process(tmp_path):
    generate(tmp_path / "sc", images=10, seed=2, image_size=32)
    m = write_shards(load_annotations(tmp_path / "sc" / "pretrain.json", "pretrain"), tmp_path / "sc", tmp_path / "sh", 5)
    pattern = str(tmp_path / "sh" / m["pattern"])
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    # The rendezvous store is hosted here, not by one of the agents: two agents on one host otherwise race to host
    # it, and when the hosting agent exits first the other one loses the store while still polling it (seen as
    # "RendezvousConnectionError" and a worker killed with SIGABRT). On real nodes the host node outlives the job.
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vlprune-test",
           "--rdzv-conf", "is_host=false", "--max-restarts", "0", str(WORKER), str(tmp_path), pattern,
           str(tmp_path / "model.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in nodes]
    del store
    assert [p.returncode for p in nodes] == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    info = [json.loads((tmp_path / f"node{r}.json").read_text()) for r in (0, 1)]
    assert sorted(i["node"] for i in info) == [0, 1] and all(i["nodes"] == 2 and i["world"] == 2 for i in info)
    assert all(i["local_rank"] == 0 for i in info)  # one process per node
    torch.manual_seed(0)
    single = _run(vlprune.build_model("tiny"), slice(0, 2 * B), ddp=False)
    for r in (0, 1):
        got = torch.load(tmp_path / f"momentum{r}.pt", weights_only=True)
        assert got.keys() == single.keys()
        for k in single:
            torch.testing.assert_close(got[k], single[k], rtol=1e-4, atol=1e-5, msg=f"rank {r}: {k}")
    # large-gallery retrieval split over the two nodes: the metrics of one process
    from test_retrieval_large import gallery_case
    from vlprune.tasks.retrieval_large import evaluate_large_gallery

    model, images, ids, mask, img2txt, txt2img = gallery_case()
    one = evaluate_large_gallery(model, images.shape[0], lambda rows: images[list(rows)], ids, mask, img2txt, txt2img,
                                 k=4, batch_size=5, chunk=4, backend="torch")[0]
    assert all(i["gallery"] == pytest.approx(one) for i in info)
    # shards under two nodes: each rank trained on its own range, in the reader's order for that rank; killed
    # after step 1 and resumed, each rank saw the same micro-batches and the model is bitwise the same
    loader = ImageLoader(None, 32, (0.5,) * 3, (0.5,) * 3)
    for i in info:
        assert i["steps"] == 3 and i["part_steps"] == 1 and i["rest_steps"] == 3
        ds = ShardDataset(pattern, loader, 3, i["rank"], 2, seed=4, buffer=4)
        per_epoch = ds.num_samples // 3 * 3  # whole batches of each epoch, epochs one after the other
        expect = [r.key for e in range(3) for r in list(ds.sequence(e))[:per_epoch]][:9]
        assert [k for b in i["full_keys"] for k in b] == expect
        assert i["keys"] == i["full_keys"]
    first = [set(sum(i["full_keys"], [])[:per_epoch]) for i in info]  # epoch 0: the ranks' shares are disjoint
    assert len(first[0]) == len(first[1]) == per_epoch and not first[0] & first[1]
    a, b = load_checkpoint(tmp_path / "run")["model"], load_checkpoint(tmp_path / "part")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow  # torchrun's agent and two workers, started twice: ~30 s on 2 busy cores
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("kill_rank", [1])
def test_elastic_restart_after_one_rank_dies(tmp_path, kill_rank):
    generate(tmp_path / "sc", images=16, seed=2, image_size=32)
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", str(WORKER), "elastic", str(tmp_path),
           str(tmp_path / "model.json"), str(tmp_path / "sc" / "pretrain.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "VLPRUNE_KILL_RANK": str(kill_rank), "VLPRUNE_KILL_STEP": "2", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    log = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, log[-6000:]
    # the first attempt never finished on any rank (the killed one died, torchrun stopped the other); the second
    # attempt resumed on both ranks from the same checkpoint: step 1 or 2, whichever rank 0 had written
    assert not list(tmp_path.glob("elastic-*-0.json")), log[-4000:]
    info = [json.loads((tmp_path / f"elastic-{r}-1.json").read_text()) for r in (0, 1)]
    assert info[0]["resumed_from"] == info[1]["resumed_from"] in (1, 2)
    assert all(i["steps"] == 4 for i in info)
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(tmp_path / "part")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
