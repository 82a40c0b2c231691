"""vlprune.runtime and the speed tools of the bench: default threads and what runs record about them, precision
checks and autocast, torch.compile's fallback and regional compilation, the plain-PyTorch reference model, the
per-op profile tables, interleaved training steps (pre-training and VQA) and the global CLI flags."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import vlprune
from vlprune import runtime
from vlprune.bench.profile import CATEGORY_ORDER, OpProfile, category, category_table, profile_calls, top_ops_table
from vlprune.bench.reference import PlainALBEF
from vlprune.cli import main
from vlprune.models.build import build_model

from conftest import make_batch


def _model(cfg):
    return build_model(vlprune.config.override(cfg, use_momentum=False, queue_size=0)).eval()


# ---- threads ----------------------------------------------------------------------------------------------------


def test_default_threads_divide_the_cores_among_local_processes(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runtime.available_cores() == 8 and runtime.default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.local_processes() == 2 and runtime.default_threads() == 4
    assert runtime.default_threads(parallel=3) == 1  # 8 // 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert runtime.default_threads() == 1  # never 0


def test_apply_threads_precedence_and_what_is_recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "5")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)
    info = runtime.apply_threads(None)
    assert calls == [2] and info["threads_source"] == "cores/processes" and info["processes"] == 3
    assert info["cores_available"] == 6 and info["MKL_NUM_THREADS"] == "5" and info["OMP_NUM_THREADS"] is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert runtime.apply_threads(None)["threads_source"] == "OMP_NUM_THREADS" and calls[-1] == 4
    assert runtime.apply_threads(3)["threads_source"] == "--threads" and calls[-1] == 3
    with pytest.raises(ValueError, match="--threads must be an integer >= 1, got 0"):
        runtime.apply_threads(0)


# ---- precision --------------------------------------------------------------------------------------------------


def test_check_precision_names_the_flag_and_the_values(monkeypatch):
    assert runtime.check_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match=r"--precision must be one of fp32, bf16, fp16, got 'fp8'"):
        runtime.check_precision("fp8", "cpu")
    monkeypatch.setattr(runtime, "_cpu_fp16_supported", lambda: False)
    with pytest.raises(ValueError, match="fp16 on CPU: this CPU has no native fp16 kernels.*use bf16"):
        runtime.check_precision("fp16", "cpu")
    monkeypatch.setattr(runtime, "_cpu_fp16_supported", lambda: True)
    assert runtime.check_precision("fp16", "cpu") == "fp16"


def test_bf16_autocast_runs_the_model_in_bf16_close_to_fp32(tiny_cfg):
    model = _model(tiny_cfg)
    images, ids, mask = make_batch(model.cfg)
    with torch.no_grad():
        ref = model(images, ids, mask).itm_logits
        with runtime.precision_context("bf16", "cpu"):
            out = model(images, ids, mask)
        with runtime.precision_context("fp32", "cpu"):
            same = model(images, ids, mask).itm_logits
    assert out.itm_logits.dtype == torch.bfloat16  # the linear layers ran in bf16
    assert torch.equal(same, ref)  # fp32 is a no-op
    assert torch.allclose(out.itm_logits.float(), ref, atol=0.05, rtol=0.05)


# ---- compile ----------------------------------------------------------------------------------------------------


def test_compile_falls_back_with_a_warning_without_a_cxx_compiler(tiny_cfg, monkeypatch, caplog):
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    model = _model(tiny_cfg)
    with caplog.at_level(logging.WARNING, logger="vlprune.runtime"):
        assert runtime.maybe_compile(model, True, "cpu") is False
    assert "needs a C++ compiler" in caplog.text and "running eagerly" in caplog.text
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
    assert runtime.maybe_compile(model, False, "cpu") is False


def test_regional_compilation_compiles_the_repeated_layers(tiny_cfg):
    model = _model(tiny_cfg)
    blocks = runtime.repeated_blocks(model)
    expected = list(model.vision.layers) + list(model.text.layers) + list(model.fusion.layers)
    assert [id(b) for b in blocks] == [id(b) for b in expected]


@pytest.mark.slow
def test_compiled_model_gives_the_eager_outputs(tiny_cfg):
    if runtime.compile_unavailable("cpu"):
        pytest.skip(runtime.compile_unavailable("cpu"))
    model = _model(tiny_cfg)
    vlprune.models.build.attach(model, vlprune.ReduceConfig("evit", layers=(2, 3), keep=0.7))
    images, ids, mask = make_batch(model.cfg)
    with torch.no_grad():
        ref = model(images, ids, mask).itm_logits
        assert runtime.maybe_compile(model, True, "cpu")
        out = model(images, ids, mask).itm_logits
    assert torch.allclose(out, ref, atol=1e-5)


# ---- the plain-PyTorch reference --------------------------------------------------------------------------------


def test_plain_pytorch_reference_computes_the_same_itm_logits(tiny_cfg):
    model = _model(tiny_cfg)
    plain = PlainALBEF(model).eval()
    images, ids, mask = make_batch(model.cfg)  # captions of different lengths: padding masks are honoured
    assert (mask == 0).any()
    with torch.no_grad():
        assert torch.allclose(plain(images, ids, mask), model(images, ids, mask).itm_logits, atol=1e-5)
    assert not any(hasattr(m, "reducer") for m in plain.modules())


def test_plain_reference_refuses_vilt(tiny_vilt_cfg):
    with pytest.raises(ValueError, match="built for ALBEF-style models, not 'vilt'"):
        PlainALBEF(build_model(tiny_vilt_cfg))


# ---- profile tables ---------------------------------------------------------------------------------------------


def test_profile_categories_sum_to_the_total_and_excess_uses_the_ideal():
    assert category("aten::addmm") == "matmul" and category("aten::gather") == "data movement"
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category("aten::no_such_op") == "other"
    base = OpProfile("none", {"aten::addmm": 80.0, "aten::gather": 20.0}, {"aten::addmm": 4, "aten::gather": 2})
    meth = OpProfile("m", {"aten::addmm": 40.0, "aten::gather": 30.0}, {"aten::addmm": 4, "aten::gather": 3})
    cats = meth.by_category()
    assert tuple(cats) == CATEGORY_ORDER and sum(cats.values()) == pytest.approx(meth.total_ms)
    table = category_table([base, meth], ideals=[1.0, 2.0])
    # excess = time in the method - time in none / ideal: matmul 40 - 80/2 = 0, data movement 30 - 20/2 = +20
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert rows["matmul"].endswith("+0.0") and "+20.0" in table.splitlines()[7]
    assert rows["total"].endswith("+20.0")
    assert "gather" in top_ops_table([base, meth], top=2)


def test_profile_calls_interleave_and_count_every_op(tiny_cfg):
    model = _model(tiny_cfg)
    images, ids, mask = make_batch(model.cfg)
    seen = []

    def fwd():
        with torch.inference_mode():
            model(images, ids, mask)

    profs = profile_calls([("a", lambda: seen.append("a"), fwd), ("b", lambda: seen.append("b"), fwd)], rounds=2,
                          warmup=0)
    assert seen == ["a", "b", "a", "b", "b", "a"]  # set-ups: warm-up pass, then rounds in a rotating order
    for p in profs:
        assert p.calls["aten::addmm"] == pytest.approx(profs[0].calls["aten::addmm"]) and p.total_ms > 0
        assert p.by_category()["matmul"] > 0


# ---- the bench command ------------------------------------------------------------------------------------------


def _rows(capsys, argv):
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_rows_record_threads_precision_cpu_time_and_the_reference(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = _rows(capsys, ["--threads", "1", "bench", "--json", "--repeats", "2", "--warmup", "0", "--batch-size", "2",
                          "--reference", "--precision", "bf16", "--method", "evit", "--layers", "2,3"])
    assert [r["label"] for r in rows] == ["none", "evit(L2,3)", "plain-pytorch"]
    for r in rows:
        assert r["threads"] == 1 and r["threads_source"] == "--threads" and r["OMP_NUM_THREADS"] == "1"
        assert "MKL_NUM_THREADS" in r and r["precision"] == "bf16" and r["compiled"] is False
        assert len(r["cpu_times_s"]) == 2 and r["cpu_throughput"] > 0
    ref = rows[-1]
    assert ref["slot_overhead"] == pytest.approx(ref["throughput"] / rows[0]["throughput"] - 1)
    assert ref["gflops_total"] == rows[0]["gflops_total"]


def test_bench_train_vqa_and_reference_rows_interleaved(capsys):
    rows = _rows(capsys, ["bench", "--json", "--train", "--train-task", "vqa", "--repeats", "1", "--warmup", "0",
                          "--batch-size", "2", "--reference", "--method", "tome", "--option", "r=2"])
    assert [r["label"] for r in rows] == ["none", "tome(r=2)", "none:itm", "plain-pytorch:itm"]
    none, tome = rows[0], rows[1]
    assert none["train_task"] == "vqa" and none["mode"] == "train"
    assert tome["gflops_step"] < none["gflops_step"] and none["gflops_step"] > 2 * none["gflops_total"]
    assert tome["ideal_speedup"] == pytest.approx(none["gflops_step"] / tome["gflops_step"])
    assert rows[3]["ideal_speedup"] == 1.0 and "slot_overhead" in rows[3]


def test_bench_profile_prints_the_tables(capsys, tmp_path):
    path = tmp_path / "rows.jsonl"
    assert main(["bench", "--profile", "--batch-size", "2", "--warmup", "0", "--method", "tome", "--option", "r=2",
                 "--json-out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "FLOPs-ideal speed-up: none 1.00, tome(r=2)" in out and "data movement" in out and "addmm" in out
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["none", "tome(r=2)"]
    assert sum(rows[1]["profile_categories"].values()) == pytest.approx(rows[1]["profile_ms"])


def test_precision_and_compile_flags_are_refused_where_unused(capsys):
    assert main(["info", "--precision", "bf16"]) == 2
    assert "--precision is for train, eval, bench; 'vlprune info' does not use it" in capsys.readouterr().err
    assert main(["info", "--compile"]) == 2 and "--compile is for" in capsys.readouterr().err


def test_train_config_checks_its_precision():
    from vlprune.train import TrainConfig

    with pytest.raises(ValueError, match="precision must be auto or one of fp32, bf16, fp16, got 'fp8'"):
        TrainConfig(precision="fp8")
    assert TrainConfig().precision == "auto" and TrainConfig(precision="bf16").compile is False


def test_precision_is_the_one_switch_and_old_amp_configs_load(tmp_path):
    """`amp` is gone from TrainConfig; an older train_config.json (or caller) with amp=False means fp32."""
    import json
    from dataclasses import fields, replace

    from vlprune.config import to_dict
    from vlprune.train import TrainConfig, read_train_config, resume_differences, RESUMABLE_CHANGES

    assert "amp" not in {f.name for f in fields(TrainConfig)} and "amp" not in to_dict(TrainConfig())
    assert TrainConfig(amp=False).precision == "fp32" and TrainConfig(amp=True).precision == "auto"
    assert TrainConfig(amp=False, precision="bf16").precision == "bf16"  # a typed precision wins
    with pytest.raises(ValueError, match="amp must be True or False, got 1"):
        TrainConfig(amp=1)
    for amp, want in ((True, "auto"), (False, "fp32")):
        path = tmp_path / f"{amp}.json"
        path.write_text(json.dumps({**to_dict(TrainConfig()), "amp": amp}))
        assert read_train_config(path).precision == want
    cfg = TrainConfig(steps=5)
    assert resume_differences(cfg, replace(cfg, steps=9, threads=2, compile=True)) == []
    assert resume_differences(cfg, replace(cfg, lr=1.0, seed=3)) == ["lr (saved 0.0001, now 1.0)", "seed (saved 0, now 3)"]
    assert set(RESUMABLE_CHANGES) <= {f.name for f in fields(TrainConfig)}


@pytest.mark.slow
def test_bench_compile_times_compiled_and_eager_rows(capsys):
    if runtime.compile_unavailable("cpu"):
        pytest.skip(runtime.compile_unavailable("cpu"))
    rows = _rows(capsys, ["--threads", "1", "--compile", "bench", "--json", "--repeats", "1", "--warmup", "0",
                          "--batch-size", "2"])
    assert [r["label"] for r in rows] == ["none", "none:eager"]
    assert rows[0]["compiled"] and not rows[1]["compiled"] and rows[0]["compile_s"] >= 0
    assert rows[0]["compile_speedup"] == pytest.approx(rows[0]["throughput"] / rows[1]["throughput"])
