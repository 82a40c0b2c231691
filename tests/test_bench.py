"""vlprune.bench: FLOPs counted by running the model equal the analytic count (attention included on CPU);
tokens per layer; timing/memory helpers; the pre-training step; the ``vlprune bench`` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vlprune
from vlprune.bench.flops import analytic_flops, count_flops, flop_counter_mode, layer_tokens, tokens_after
from vlprune.bench.memory import measure_peak, tensor_bytes
from vlprune.bench.throughput import find_max_batch, fits_budget, time_call, time_interleaved
from vlprune.bench.train_step import pretrain_loss
from vlprune.cli import main

from conftest import make_batch
from toy_reducers import install

VILT = dict(arch="vilt", vision=dict(image_size=32, patch_size=8, width=32, layers=4, heads=4, mlp_dim=37),
            text=dict(vocab_size=101, width=32, layers=0, heads=4, mlp_dim=37, max_len=40), fusion_layers=0)


def _cfg(name):
    """Test configs without momentum copies or queues (never used by a forward pass; cheaper to build)."""
    if name == "vilt":
        return vlprune.ModelConfig(**VILT)
    return vlprune.config.override(vlprune.load_preset(name), use_momentum=False, queue_size=0)


def _check_counted_vs_analytic(model, batch_size=2, lengths=None):
    model.eval()
    images, ids, mask = make_batch(model.cfg, lengths=lengths or (5,) * batch_size)
    counted = count_flops(model, images, ids, mask)
    lt = layer_tokens(model, images, ids, mask)
    analytic = analytic_flops(model.cfg, ids.shape[1], lt, batch=images.shape[0])
    assert counted.total - counted.select == analytic["total"]
    if model.cfg.arch == "albef":
        vis_select = sum(v for k, v in counted.by_module.items() if k.startswith("ALBEF.vision.") and k.endswith(".reducer"))
        assert counted.image - vis_select == analytic["image"]
    return counted, lt


def test_cpu_sdpa_is_counted():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    for bias in (None, torch.zeros(2, 1, 1, 7)):
        with flop_counter_mode() as fc:
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        assert fc.get_total_flops() == 4 * 2 * 4 * 5 * 7 * 8


def test_cpu_sdpa_backward_is_counted():
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    with flop_counter_mode() as fc:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    # forward 2 matmuls, backward 4 (dV, dP, dQ, dK) + recompute of the scores (flash): >= 3x forward
    assert fc.get_total_flops() >= 3 * 4 * 2 * 6 * 6 * 4


@pytest.mark.parametrize("name", ["tiny", "small", "vilt"])
def test_counted_equals_analytic_none(name):
    counted, lt = _check_counted_vs_analytic(vlprune.build_model(_cfg(name)))
    assert counted.select == 0
    n0 = 1 + _cfg(name).vision.num_patches
    assert lt.patches == n0 - 1 and all(t.attn == t.mlp == n0 for rows in lt.layers.values() for t in rows)


TOY_CASES = [(name, group, layers, keep, where, fuse)
             for name, group, layers in [("tiny", "vision", (2, 3)), ("tiny", "fusion", (1,)), ("vilt", "joint", (2, 4))]
             for keep in (0.7, 0.5, 0.25)
             for where, fuse in (("mid", True), ("mid", False), ("pre", True))
             if where == "mid" or group == "vision"]  # only ViT layers honour where="pre"
TOY_CASES += [("small", "vision", (2, 4, 5), 0.5, "mid", True), ("small", "vision", (1, 3), 0.7, "pre", False)]


@pytest.mark.parametrize("name,group,layers,keep,where,fuse", TOY_CASES)
def test_counted_equals_analytic_toy_reducer(name, group, layers, keep, where, fuse):
    model = install(vlprune.build_model(_cfg(name)), group, layers, keep, fuse, where)
    counted, lt = _check_counted_vs_analytic(model)
    assert counted.select > 0
    after = tokens_after(lt)[group]
    assert after[layers[0] - 1] < after[0] or layers[0] == 1  # fewer tokens after the first reduction


def test_tokens_per_layer_follow_the_reductions():
    model = install(vlprune.build_model("tiny"), "vision", (2, 4), keep=0.5).eval()
    images, ids, mask = make_batch(model.cfg)
    lt = layer_tokens(model, images, ids, mask)
    # 16 patches -> keep 8 + fused = 10 tokens; then 9 candidates -> keep 5 + fused = 7
    assert tokens_after(lt) == {"vision": [17, 10, 10, 7], "fusion": [7, 7]}
    assert [(t.attn, t.mlp) for t in lt.layers["vision"]] == [(17, 17), (17, 10), (10, 10), (10, 7)]
    pre = install(vlprune.build_model("tiny"), "vision", (2,), keep=0.5, where="pre").eval()
    assert [(t.attn, t.mlp) for t in layer_tokens(pre, images, ids, mask).layers["vision"]][1] == (10, 10)


# Real methods: every registered method, with its working tiny configuration from tests/method_cases.py (a
# method missing there fails), at several keep rates where the method has a keep rate, on the
# tiny model and on the "small" preset.
def _registered():
    return [m for m in vlprune.list_methods() if m != "none"]


def _method_model(method, preset, keep_scale=1.0):
    from method_cases import CASES, model_config

    if method not in CASES:
        pytest.fail(f"{method} has no configuration in tests/method_cases.py (every registered method needs one)")
    case = CASES[method]
    cfg = model_config(case["model"]) if preset == "tiny" else _cfg(preset)
    if preset != "tiny" and case["model"] != "tiny":
        pytest.skip(f"{method} runs on {case['model']}")
    keep = case["keep"]
    if keep is not None and keep_scale != 1.0:
        keep = tuple(k * keep_scale for k in keep) if isinstance(keep, tuple) else keep * keep_scale
    rc = vlprune.ReduceConfig(method, layers=case["layers"], keep=keep, options=case["options"])
    return vlprune.build_model(cfg, method=rc)


@pytest.mark.parametrize("method", _registered() or [pytest.param("-", marks=pytest.mark.skip("no methods yet"))])
@pytest.mark.parametrize("preset,keep_scale", [("tiny", 1.0), ("tiny", 0.5), ("small", 1.0)])
def test_counted_equals_analytic_registered_methods(method, preset, keep_scale):
    model = _method_model(method, preset, keep_scale)
    counted, lt = _check_counted_vs_analytic(model)
    if method != "lowres":
        assert lt.patches == model.cfg.vision.num_patches


def test_find_max_batch_bisects():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 37

    assert find_max_batch(fits) == 37
    assert calls[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert find_max_batch(lambda b: True, cap=100) == 100
    with pytest.raises(ValueError, match="not even batch size 1"):
        find_max_batch(lambda b: False)


def test_fits_budget_needs_a_budget_on_cpu():
    with pytest.raises(ValueError, match="--mem-budget"):
        fits_budget(lambda b: 1.0, None, torch.device("cpu"))
    fits = fits_budget(lambda b: float(b), 10.0, torch.device("cpu"))
    assert fits(10) and not fits(11)


def test_time_call_counts_and_rejects_bad_repeats():
    n = []
    times = time_call(lambda: n.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(times) == 3 and len(n) == 5 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, torch.device("cpu"), repeats=0)


def test_measure_peak_sees_a_large_allocation():
    def alloc():
        t = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
        return float(t[-1])

    out, peak = measure_peak(alloc, torch.device("cpu"))
    assert out == 1.0
    if peak is not None:  # None where /proc/self/clear_refs is unavailable
        assert peak >= 60


def test_tensor_bytes_counts_tied_weights_once():
    lin = torch.nn.Linear(4, 3)
    assert tensor_bytes(lin) == (12 + 3) * 4
    model = vlprune.build_model("tiny")
    n = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert tensor_bytes(model) == n


def test_pretrain_loss_trains_the_model():
    model = install(vlprune.build_model("tiny"), "vision", (2,), keep=0.5).train()
    images, ids, mask = make_batch(model.cfg)
    g = torch.Generator().manual_seed(0)
    ptr = int(model.queue_ptr)
    losses = pretrain_loss(model, images, ids, mask, g)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for name in ("vision.embeddings.patch_embed.weight", "text.layers.0.attn.qkv.weight", "fusion.layers.1.mlp.fc2.weight",
                 "itm_head.weight", "mlm_head.dense.weight", "vision_proj.weight", "temp"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert int(model.queue_ptr) == (ptr + 3) % model.cfg.queue_size
    with pytest.raises(ValueError, match="batch size >= 2"):
        pretrain_loss(model, images[:1], ids[:1], mask[:1], g)


def test_pretrain_step_updates_weights_and_momentum_copies():
    from vlprune.bench.train_step import PretrainStep

    model = vlprune.build_model("tiny", momentum=0.5)
    images, ids, mask = make_batch(model.cfg)
    w0 = model.vision.layers[0].mlp.fc1.weight.detach().clone()
    m0 = model.momentum_encoders["vision"].layers[0].mlp.fc1.weight.detach().clone()
    step = PretrainStep(model, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(step(images, ids, mask)))
    step(images, ids, mask)  # the momentum update runs before each step's forward
    assert not torch.equal(model.vision.layers[0].mlp.fc1.weight, w0)
    assert not torch.equal(model.momentum_encoders["vision"].layers[0].mlp.fc1.weight, m0)
    assert len(step.optimizer.state) > 0


# --------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------

KEYS = {"method", "gflops_image", "gflops_total", "throughput", "latency_ms", "peak_mem_mb", "tokens_per_layer", "speedup"}


def _json_rows(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return [json.loads(line) for line in out]


def test_cli_flops_only_json(capsys):
    rows = _json_rows(capsys, ["bench", "--model", "tiny", "--flops-only", "--json", "--method", "none"])
    assert len(rows) == 1 and KEYS <= set(rows[0])
    r = rows[0]
    assert r["method"] == "none" and r["throughput"] is None and r["speedup"] is None
    assert r["tokens_per_layer"] == {"vision": [17] * 4, "fusion": [17] * 2}
    assert r["gflops_total"] == pytest.approx(r["gflops_analytic"], rel=0, abs=1e-12)
    assert 0 < r["gflops_image"] < r["gflops_total"]


def test_cli_image_size_and_text_len_change_the_count(capsys):
    base = _json_rows(capsys, ["bench", "--flops-only", "--json"])[0]
    big = _json_rows(capsys, ["bench", "--flops-only", "--json", "--image-size", "64", "--text-len", "10"])[0]
    assert big["image_size"] == 64 and big["tokens_per_layer"]["vision"] == [65] * 4
    assert big["gflops_image"] > base["gflops_image"]


def test_cli_quick_timed_run(capsys):
    rows = _json_rows(capsys, ["bench", "--model", "tiny", "--json", "--repeats", "1", "--warmup", "0", "--batch-size", "2"])
    r = rows[0]
    assert KEYS <= set(r) and r["batch_size"] == 2
    assert r["throughput"] > 0 and r["latency_ms"] > 0 and r["speedup"] == pytest.approx(1.0)
    assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0


def test_cli_table_and_progress(capsys):
    assert main(["bench", "--model", "tiny", "--repeats", "1", "--warmup", "0", "--batch-size", "2"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert lines[0].split()[:3] == ["method", "GFLOPs", "img"] and lines[2].startswith("none")
    assert "timing" in cap.err and "[1/1] none" in cap.err


def test_cli_max_batch_within_a_budget(capsys):
    rows = _json_rows(capsys, ["bench", "--json", "--max-batch", "--mem-budget", "0.02", "--repeats", "1", "--warmup", "0"])
    r = rows[0]
    if r["peak_mem_mb"] is None:
        pytest.skip("peak memory is not measurable on this platform")
    assert r["batch_size"] >= 1 and r["static_mem_mb"] < 20


def test_cli_train_mode(capsys):
    rows = _json_rows(capsys, ["bench", "--model", "tiny", "--train", "--json", "--repeats", "1", "--warmup", "0",
                               "--batch-size", "3"])
    r = rows[0]
    assert r["mode"] == "train" and KEYS <= set(r)
    assert r["throughput"] > 0 and r["step_ms"] > 0 and r["gflops_step"] > 2 * r["gflops_total"]


@pytest.mark.parametrize("argv,match", [
    (["--method", "none", "--method", "nosuch"], r"unknown reduction method 'nosuch'; valid: none, trips"),
    (["--image-size", "30"], "not divisible by vision.patch_size=8"),
    (["--keep", "0.5"], "need --method NAME"),
    (["--text-len", "41"], "exceeds the model's max_len 40"),
    (["--mem-budget", "-1"], "memory budget must be a positive number of GB"),
    (["--device", "tpu"], "device must be"),
    (["--method", "none", "--layers", "1"], "takes no layers"),
])
def test_cli_errors(capsys, argv, match):
    import re

    assert main(["bench", "--repeats", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("vlprune bench: error:")


def test_method_flags_configure_the_method_they_follow():
    import argparse

    from vlprune.commands.method_flags import add_method_flags, method_configs

    p = argparse.ArgumentParser(allow_abbrev=False)
    add_method_flags(p, several=True)
    args = p.parse_args(["--method", "trips", "--layers", "5,10", "--keep", "0.7", "--method", "elip", "--keep",
                         "0.9,0.6", "--option", "lookahead=false", "--option", "mode=fast", "--option", "r=[18,12]"])
    trips, elip = method_configs(args, several=True)
    assert (trips.name, trips.layers, trips.keep, trips.options) == ("trips", (5, 10), 0.7, {})
    assert elip.keep == (0.9, 0.6) and elip.options == {"lookahead": False, "mode": "fast", "r": [18, 12]}
    args = p.parse_args(["--layers", "2", "--method", "evit"])  # settings before the first --method are its own
    assert method_configs(args, several=True)[0].layers == (2,)
    with pytest.raises(ValueError, match="give one --method"):
        method_configs(p.parse_args(["--method", "trips", "--method", "evit"]))
    for bad in (["--option", "keep"], ["--layers", "a,b"], ["--keep", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(["--method", "trips", *bad])


def test_cli_methods_with_settings(capsys):
    rows = _json_rows(capsys, ["bench", "--flops-only", "--json", "--method", "none", "--method", "none"])
    assert [r["method"] for r in rows] == ["none", "none"]
    assert main(["bench", "--flops-only", "--method", "none", "--layers", "1"]) == 2
    assert "takes no layers" in capsys.readouterr().err


def test_time_interleaved_rotates_and_sets_up_each_call():
    log = []
    calls = [(lambda n=n: log.append(("setup", n)), lambda n=n: log.append(("run", n))) for n in "abc"]
    times = time_interleaved(calls, torch.device("cpu"), warmup=1, repeats=3)
    assert [len(t) for t in times] == [3, 3, 3]
    runs = [n for kind, n in log if kind == "run"]
    assert runs[:3] == ["a", "b", "c"]  # warm-up
    assert runs[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotating rounds
    assert all(log[i - 1] == ("setup", n) for i, (kind, n) in enumerate(log) if kind == "run")  # setup before each
    ticks = []
    time_interleaved(calls, torch.device("cpu"), warmup=2, repeats=3, tick=lambda: ticks.append(len(log)))
    assert len(ticks) == (2 + 3) * 3 and ticks == sorted(ticks)  # one progress update after every call


def test_bench_shows_a_bar_over_the_timed_rounds(capsys):
    """The CLI's bench draws a progress bar (stderr) over its timed calls; --quiet draws none."""
    argv = ["bench", "--model", "tiny", "--text-len", "6", "--batch-size", "2", "--repeats", "2", "--warmup", "1",
            "--method", "none", "--method", "random", "--keep", "0.5", "--layers", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "throughput" in err and "6/6" in err and "latency" in err
    assert main(["--quiet"] + argv) == 0
    assert "throughput" not in capsys.readouterr().err


def test_bench_lowres_before_another_method_leaves_the_input_size(tmp_path):
    """Validating a lowres config must not leave the smaller input size behind for the next method."""
    from vlprune.bench.runner import BenchSettings, run_bench
    from vlprune.reduce.registry import ReduceConfig

    s = BenchSettings(model="tiny", text_len=6, batch_size=2, repeats=1, flops_only=True)
    rows = run_bench(s, [ReduceConfig("lowres", options={"image_size": 16}), ReduceConfig("tome", layers=(2,), options={"r": 6})])
    by = {r["method"]: r for r in rows}
    assert by["tome"]["image_size"] == by["none"]["image_size"]
    assert by["lowres"]["gflops_image"] < by["tome"]["gflops_image"] < by["none"]["gflops_image"]
    assert by["lowres"]["tokens_per_layer"]["vision"][0] == 1 + 4 and by["tome"]["tokens_per_layer"]["vision"][0] == 1 + 16
