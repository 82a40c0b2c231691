"""Activation checkpointing (``models.base.set_grad_checkpointing``): the same gradients as without it, with and
without token reduction, the blocks really recomputed in the backward pass, the run's generator left where it
would be without it, and less memory held for the backward pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.utils.checkpoint

import vlprune
from vlprune.models.base import set_grad_checkpointing
from conftest import make_batch

METHODS = {
    "none": None,
    "trips": vlprune.ReduceConfig("trips", layers=(2, 3), keep=0.5),
    "random": vlprune.ReduceConfig("random", layers=(2, 3), keep=0.5),
    "tome": vlprune.ReduceConfig("tome", options={"r": 3}),
    "dynamicvit": vlprune.ReduceConfig("dynamicvit", layers=(2, 3), keep=0.6),
    "elip": vlprune.ReduceConfig("elip", layers=(2, 3), keep=(0.7, 0.4)),
}


def _model(cfg, method, checkpointing: bool, dropout: float = 0.1):
    torch.manual_seed(0)
    cfg = vlprune.config.override(cfg, **{"text.dropout": dropout})
    model = vlprune.build_model(cfg, method).train()
    n = set_grad_checkpointing(model, checkpointing)
    return model, n


def _loss(out) -> torch.Tensor:
    """A loss that reaches every part: fused states, ITM, the image tokens and the learned methods' records."""
    loss = out.itm_logits.square().sum() + out.fused.square().mean() + out.fused_image.x.square().mean()
    for rec in out.fused_image.aux:
        for v in rec.values.values():
            if torch.is_tensor(v) and v.is_floating_point():
                loss = loss + v.square().mean()
    return loss


def _grads(cfg, batch, method, checkpointing: bool, seed: int = 5):
    """Gradients of every parameter and the run generator's next draw after one forward and backward pass."""
    model, _ = _model(cfg, method, checkpointing)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(1)  # dropout and any global draw
    _loss(model(*batch, generator=gen)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return grads, torch.rand(4, generator=gen), torch.rand(4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradients_equal_with_and_without_checkpointing(tiny_cfg, batch, name):
    ref, ref_next, ref_global = _grads(tiny_cfg, batch, METHODS[name], False)
    got, got_next, got_global = _grads(tiny_cfg, batch, METHODS[name], True)
    assert ref.keys() == got.keys() and len(ref) > 20
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")
    # the run's generator and torch's global one end where they would without checkpointing
    assert torch.equal(got_next, ref_next) and torch.equal(got_global, ref_global)


def test_vilt_tip_gradients_equal(tiny_vilt_cfg):
    batch = make_batch(tiny_vilt_cfg)
    method = vlprune.ReduceConfig("tip", layers=(1, 3), keep=0.5)

    def grads(ck):
        torch.manual_seed(0)
        model = vlprune.build_model(tiny_vilt_cfg, method).train()
        assert set_grad_checkpointing(model, ck) == tiny_vilt_cfg.vision.layers
        out = model(*batch, generator=torch.Generator().manual_seed(3))
        loss = out.itm_logits.square().sum() + out.image.x.square().mean()
        loss = loss + sum(r.values["keep_prob"].square().mean() for r in out.image.aux)
        loss.backward()
        return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    ref, got = grads(False), grads(True)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


def _count_calls(model):
    """Forward calls per block type, and the random reducer's kept-token counts per call."""
    calls = {"blocks": 0, "reducer_out": []}

    def block_hook(mod, args):
        calls["blocks"] += 1

    def reducer_hook(mod, args, out):
        calls["reducer_out"].append(out.x.detach().clone())

    for m in model.modules():
        if hasattr(type(m), "grad_checkpointing"):
            m.register_forward_pre_hook(block_hook)
    for r in model.reducers().values():
        r.register_forward_hook(reducer_hook)
    return calls


def test_blocks_recomputed_in_backward_and_reduction_replayed_exactly(tiny_cfg, batch):
    model, n_all = _model(tiny_cfg, METHODS["random"], True)
    n = tiny_cfg.vision.layers + tiny_cfg.text.layers + tiny_cfg.fusion_layers
    assert n_all == 2 * n  # the momentum copies' blocks too (they run without gradients: never recomputed)
    calls = _count_calls(model)
    out = model(*batch, generator=torch.Generator().manual_seed(7))
    assert calls["blocks"] == n and len(calls["reducer_out"]) == 2
    _loss(out).backward()
    assert calls["blocks"] > n  # the backward pass ran blocks again
    # random's second runs (recomputation) drew exactly the tokens of the first runs
    first, again = calls["reducer_out"][:2], calls["reducer_out"][2:]
    assert len(again) == 2
    for a, b in zip(first, sorted(again, key=lambda t: -t.shape[1])):
        assert torch.equal(a, b)


def test_inference_and_no_grad_are_not_checkpointed(tiny_cfg, batch):
    model, n_all = _model(tiny_cfg, METHODS["trips"], True)
    n = n_all // 2  # the momentum copies' blocks are counted too
    calls = _count_calls(model)
    with torch.no_grad():
        model(*batch)
    model.eval()
    out = model(*batch)
    _loss(out).backward()
    assert calls["blocks"] == 2 * n  # no recomputation
    assert set_grad_checkpointing(model, False) == n_all and not any(
        m.grad_checkpointing for m in model.modules() if hasattr(type(m), "grad_checkpointing"))
    with pytest.raises(TypeError, match="True or False"):
        set_grad_checkpointing(model, "yes")


def _saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (distinct storages), at the end of the forward."""
    seen = {}

    def pack(t):
        if t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*batch, generator=torch.Generator().manual_seed(0))
    _loss(out).backward()
    return sum(seen.values())


def test_checkpointing_keeps_less_for_backward():
    cfg = vlprune.load_preset("small")
    batch = make_batch(cfg, lengths=(9, 5, 12, 7))
    held = {}
    for ck in (False, True):
        model, _ = _model(cfg, METHODS["trips"], ck)
        held[ck] = _saved_bytes(model, batch)
    # only the blocks' inputs are kept: the six ViT, two text and two fusion layers' insides are not
    assert held[True] < 0.5 * held[False], held


def test_training_run_with_checkpointing_matches(tmp_path, monkeypatch):
    """`vlprune train --grad-checkpointing` (TrainConfig.grad_checkpointing): three pre-training steps with random
    (drawing from the run's generator) and the full ALBEF objective end at the same weights."""
    from vlprune.checkpoint import load_checkpoint
    from vlprune.data.scenes import generate
    from vlprune.train import TrainConfig, train

    from vlprune.models import base

    calls = []
    monkeypatch.setattr(base, "checkpoint", lambda *a, **k: calls.append(1) or torch.utils.checkpoint.checkpoint(*a, **k))
    generate(tmp_path / "scenes", images=24, seed=3, image_size=32)
    weights = {}
    for ck in (False, True):
        cfg = TrainConfig(model="tiny", train=str(tmp_path / "scenes" / "pretrain.json"), steps=3, batch_size=4,
                          lr=5e-4, seed=1, threads=1, method=METHODS["random"], grad_checkpointing=ck)
        train(cfg, tmp_path / f"run{int(ck)}")
        weights[ck] = load_checkpoint(tmp_path / f"run{int(ck)}")["model"]
        saved = json.loads((tmp_path / f"run{int(ck)}" / "train_config.json").read_text())
        assert saved["grad_checkpointing"] is ck
        assert bool(calls) is ck  # the blocks ran checkpointed only when asked
    assert weights[True].keys() == weights[False].keys()
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


PEAK_SCRIPT = r"""
import json, resource, sys, torch
import vlprune
from vlprune.models.base import set_grad_checkpointing
torch.set_num_threads(1)
torch.manual_seed(0)
model = vlprune.build_model("small", vlprune.ReduceConfig("trips", layers=(3, 5), keep=0.7)).train()
set_grad_checkpointing(model, sys.argv[1] == "1")
B, S = 48, model.cfg.vision.image_size
images, ids = torch.randn(B, 3, S, S), torch.randint(2, 900, (B, 24))
mask = torch.ones(B, 24, dtype=torch.long)


def step(n):
    out = model(images[:n], ids[:n], mask[:n], generator=torch.Generator().manual_seed(0))
    (out.itm_logits.square().sum() + out.fused.square().mean()).backward()


step(2)  # warm-up: lazy imports and kernel set-up (torch.utils.checkpoint's first call loads ~100 MiB of modules)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step(B)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "peak_kib": after}))
"""


def measure_peak_rss(checkpointing: bool) -> dict:
    """Peak resident memory (ru_maxrss, KiB) of a fresh process before and after one training step of the small
    model with TRIPS at batch 48 (after a warm-up step of 2 samples). glibc is told to serve every allocation of
    64 KiB or more with its own mmap (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set at
    once and the peak follows the live tensors instead of the allocator's retained heap."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "1" if checkpointing else "0"], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_lower_with_checkpointing():
    """Measured: the step's peak resident memory above the process's baseline is lower with checkpointing."""
    plain, ck = measure_peak_rss(False), measure_peak_rss(True)
    grow_plain = plain["peak_kib"] - plain["before_kib"]
    grow_ck = ck["peak_kib"] - ck["before_kib"]
    assert grow_ck < 0.5 * grow_plain, (plain, ck)


if __name__ == "__main__":  # python tests/test_checkpointing.py: the measured figures of docs/reproduce.md
    for flag in (False, True):
        r = measure_peak_rss(flag)
        print(f"checkpointing={flag}: peak RSS {r['peak_kib'] / 1024:.0f} MiB, "
              f"step added {(r['peak_kib'] - r['before_kib']) / 1024:.0f} MiB")
