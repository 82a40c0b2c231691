"""The trainer: losses fall, kill + resume equals an uninterrupted run, atomic checkpoints, run-dir errors, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import vlprune
from method_cases import CASES, reduce_config
from vlprune import checkpoint as ckpt_mod
from vlprune.data.tokenizer import TextTokenizer
from vlprune.tasks.base import StepContext, StepModule, get_task
from vlprune.checkpoint import load_checkpoint, save_checkpoint
from vlprune.cli import main
from vlprune.data.scenes import generate
from vlprune.rundir import RunDirBusyError, run_lock
from vlprune.train import TrainConfig, train


# the tiny preset with a vocabulary large enough for whole scene words (shorter captions) and fewer layers
MODEL = {"arch": "albef",
         "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 4, "mlp_dim": 37},
         "text": {"vocab_size": 160, "width": 32, "layers": 1, "heads": 4, "mlp_dim": 37, "max_len": 24},
         "fusion_layers": 1, "embed_dim": 16, "queue_size": 16, "use_momentum": True}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    generate(root, images=48, seed=3, image_size=32)
    (root / "model.json").write_text(json.dumps(MODEL))
    return root


def cfg_for(scenes, **kw):
    base = dict(model=str(scenes / "model.json"), train=str(scenes / "pretrain.json"), images=str(scenes),
                batch_size=4, lr=5e-4, log_every=2, ckpt_every=2, seed=1)
    return TrainConfig(**{**base, **kw})


def params(run):
    return load_checkpoint(run)["model"]


def test_losses_fall(scenes, tmp_path):
    res = train(cfg_for(scenes, steps=60, batch_size=8, log_every=10, lr=3e-3, warmup=3), tmp_path / "run")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"] - 1.0, (first, last)  # measured on this seed: 9.03 -> 7.41
    assert last["mlm"] < first["mlm"] - 0.8  # 4.91 -> 3.60
    assert last["itc"] < first["itc"]  # 3.47 -> 3.17 (the tiny model stays near chance on ITC/ITM this soon)
    assert res["steps"] == 60 and not res["interrupted"] and res["last"] == last
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


def test_kill_then_resume_equals_uninterrupted(scenes, tmp_path):
    cfg = cfg_for(scenes, steps=5, accum=2)
    full = train(cfg, tmp_path / "full")
    assert full["steps"] == 5

    def kill(step, record):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    part = train(cfg, tmp_path / "part", callback=kill)
    assert part["interrupted"] and part["steps"] == 3 and part["signal"] == signal.SIGTERM
    assert load_checkpoint(tmp_path / "part")["step"] == 3
    assert json.loads((tmp_path / "part" / "train_config.json").read_text())["threads"] == 1
    torch.set_num_threads(2)  # another thread count in the resuming process: the run's own (1) is restored
    try:
        rest = train(cfg, tmp_path / "part", resume=True)
        assert torch.get_num_threads() == 2  # and the caller's put back afterwards
    finally:
        torch.set_num_threads(1)
    assert rest["steps"] == 5 and not rest["interrupted"] and rest["threads"] == 1
    a, b = params(tmp_path / "full"), params(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)  # bitwise: same data, same randomness
    first = train(cfg_for(scenes, steps=5, accum=2, seed=2), tmp_path / "other")  # the comparison can fail
    assert not torch.equal(params(tmp_path / "other")["vision.layers.0.attn.qkv.weight"], a["vision.layers.0.attn.qkv.weight"])
    assert first["steps"] == 5


@pytest.mark.parametrize("method", [m for m, c in CASES.items() if c["model"] == "tiny"])
def test_pretrain_step_with_every_method(method, batch):
    """One pre-training step (ITC + ITM + MLM) through the step module with each two-stream method installed:
    finite losses, and gradients reach the vision encoder, the fusion encoder and the heads."""
    torch.manual_seed(0)
    model = vlprune.build_model("tiny", method=reduce_config(method)).train()
    images, ids, mask = batch
    tok = TextTokenizer.train(["a red circle left of a blue square"], 60)
    ids = ids.clamp_max(tok.vocab_size - 1).masked_fill(mask == 0, 0)
    b = {"images": images, "ids": ids, "mask": mask, "image_id": torch.tensor([0, 1, 2]), "size": 3}
    ctx = StepContext(torch.Generator().manual_seed(0), tok, 0, 10, 0)
    out = StepModule(model, get_task("pretrain"))(b, ctx)
    assert set(out) >= {"loss", "itc", "itm", "mlm", "itm_acc", "itc_acc"}
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    for name in ("vision.layers.0.attn.qkv.weight", "fusion.layers.0.cross.kv.weight", "itm_head.weight", "temp"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_evaluate_leaves_queues_and_momentum_alone(batch):
    torch.manual_seed(0)
    model = vlprune.build_model("tiny")
    tok = TextTokenizer.train(["a red circle"], 60)
    images, ids, mask = batch
    ids = ids.clamp_max(tok.vocab_size - 1).masked_fill(mask == 0, 0)
    b = {"images": images, "ids": ids, "mask": mask, "image_id": torch.tensor([0, 1, 2]), "size": 3}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = StepContext(torch.Generator().manual_seed(0), tok, 5, 10, 0)
    res = get_task("pretrain").evaluate(model, [b, b], ctx)
    assert set(res) >= {"loss", "itc", "itm", "mlm"} and all(isinstance(v, float) for v in res.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training


def test_resume_trims_metrics_after_the_checkpoint_and_removes_orphan_temp_files(scenes, tmp_path):
    """As after a kill -9 between the checkpoint of step 2 and that of step 3: ``latest`` names step 2, metrics has
    step 3 and half a row, a checkpoint write left a temp file and a temp directory. The resumed run logs steps 3
    and 4 once each, and the stale checkpoint-3 of the abandoned future is replaced."""
    run = tmp_path / "run"

    def crash(step, record):
        if step == 3:
            raise RuntimeError("crash")

    cfg = cfg_for(scenes, steps=4, log_every=1, ckpt_every=2, save_total_limit=2)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, run, callback=crash)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    (run / "latest").write_text("checkpoint-2\n")
    assert load_checkpoint(run)["step"] == 2
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a row half-written when the process died
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"partial")  # a checkpoint write killed mid-way
    (run / ".checkpoint-4.x1y2.tmp").mkdir()
    train(cfg, run, resume=True)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert (run / "latest").read_text().strip() == "checkpoint-4"


def test_cli_resume_refuses_changed_arguments(scenes, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["--model", str(scenes / "model.json"), "--train", str(scenes / "pretrain.json"), "--images", str(scenes),
            "--batch-size", "4", "--out", out, "--quiet", "--threads", "1"]
    assert main(["train", "pretrain", "--steps", "2"] + base) == 0
    capsys.readouterr()
    saved = (tmp_path / "run" / "train_config.json").read_text()
    changed = [(["train", "pretrain", "--batch-size", "8"], ["--batch-size: saved 4, given 8"]),
               (["train", "vqa"], ["task: saved 'pretrain', given 'vqa'"]),
               (["train", "pretrain", "--method", "trips", "--lr", "0.1", "--seed", "5"],
                ["--method/--layers/--keep/--option: saved None, given {", "--lr: saved 0.0001, given 0.1",
                 "--seed: saved 0, given 5"]),
               (["train", "pretrain", "--model", "small"], ["--model: saved '", "given 'small'"]),
               (["train", "pretrain", "--loss", "itm=0"], ["task option itm: saved ", ", given 0.0"])]
    for args, parts in changed:
        assert main(args + ["--out", out, "--resume", "--steps", "3", "--quiet"]) == 2, args
        err = capsys.readouterr().err
        assert f"cannot resume {out}" in err and "only --accept-changed-inputs, --allow-outside-root, --ckpt-every, --compile, --epochs, --grad-checkpointing, --log-every, --max-image-pixels, --quiet, --save-total-limit, --steps, --threads, --workers may" in err
        for part in parts:
            assert part in err, (part, err)
    assert (tmp_path / "run" / "train_config.json").read_text() == saved  # nothing was touched
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    # the same values typed again, and the flags that may change, are accepted
    assert main(["train", "pretrain", "--out", out, "--resume", "--steps", "3", "--batch-size", "4", "--seed", "0",
                 "--workers", "0", "--log-every", "5", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["log_every"] == 5


def test_cli_sigterm_exits_143_and_the_hint_resumes_exactly(scenes, tmp_path, capsys, monkeypatch):
    import shlex

    import vlprune.train as train_mod

    args = ["train", "pretrain", "--model", str(scenes / "model.json"), "--train", str(scenes / "pretrain.json"),
            "--images", str(scenes), "--batch-size", "4", "--steps", "4", "--threads", "1", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    plain = train_mod.train

    def killed(cfg, out, **kw):
        def kill(step, record):
            if step == 2:
                signal.raise_signal(signal.SIGTERM)
        return plain(cfg, out, callback=kill, **kw)

    monkeypatch.setattr(train_mod, "train", killed)
    part = tmp_path / "part dir"
    assert main(args + ["--out", str(part)]) == 143
    hint = [l for l in capsys.readouterr().out.splitlines() if l.startswith("resume with: ")][0]
    monkeypatch.setattr(train_mod, "train", plain)
    cmd = shlex.split(hint[len("resume with: "):])
    assert cmd[0] == "vlprune" and "--threads" in cmd
    torch.set_num_threads(2)
    try:
        assert main(cmd[1:]) == 0
    finally:
        torch.set_num_threads(1)
    a, b = params(tmp_path / "full"), params(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_pretrain_rejects_vilt(tiny_vilt_cfg):
    with pytest.raises(ValueError, match="arch='albef'"):
        get_task("pretrain").check_model(vlprune.build_model(tiny_vilt_cfg))


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path)

    def broken(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "latest"]  # no temp file left, the old checkpoint intact
    assert load_checkpoint(tmp_path)["step"] == 1


def test_run_dir_errors(scenes, tmp_path):
    cfg = cfg_for(scenes, steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not a run directory that vlprune wrote"):
        train(cfg, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(cfg, tmp_path / "run", resume=True)
    with pytest.raises(FileExistsError, match="refuses to empty .* no .vlprune marker"):  # not a run: left alone
        train(cfg, tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "x").read_text() == "x"
    (tmp_path / "run" / "x").unlink()
    train(cfg, tmp_path / "run", overwrite=True)
    with pytest.raises(ValueError, match=r"lr \(saved 0.0005, now 1.0\)"):
        train(cfg_for(scenes, steps=2, lr=1.0), tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="steps or epochs"):
        TrainConfig(steps=1, epochs=1)
    with pytest.raises(ValueError, match="batch_size must be"):
        TrainConfig(batch_size=0)


def test_second_run_on_a_locked_directory_is_refused(scenes, tmp_path):
    """Two open file descriptions conflict under flock even in one process: a run while another holds the lock
    is refused at once (with --overwrite and --resume), naming the directory and the holder's pid."""
    run = tmp_path / "run"
    cfg = cfg_for(scenes, steps=1)
    train(cfg, run)
    with run_lock(run):
        for kw in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunDirBusyError, match=rf"{run}.*in use.*pid {os.getpid()}"):
                train(cfg_for(scenes, steps=2), run, **kw)
    assert load_checkpoint(run)["step"] == 1  # untouched by the refused runs
    assert train(cfg_for(scenes, steps=2), run, resume=True)["steps"] == 2  # the lock went with its holder


def test_lock_held_by_another_process_and_released_when_it_dies(scenes, tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from vlprune.rundir import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            train(cfg_for(scenes, steps=1), run, overwrite=True)
        assert main(["train", "pretrain", "--out", str(run), "--resume", "--quiet"]) == 2
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock
        holder.wait()
    assert train(cfg_for(scenes, steps=1), run, overwrite=True)["steps"] == 1


def test_lock_leaves_no_directory_behind_when_the_run_is_refused(scenes, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(cfg_for(scenes, steps=1), tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()


def test_cli_train_and_resume(scenes, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["train", "pretrain", "--model", str(scenes / "model.json"), "--train", str(scenes / "pretrain.json"), "--images", str(scenes),
            "--steps", "2", "--batch-size", "4", "--log-every", "1", "--out", out, "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "trained 2/2 steps" in text and "itc" in text
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["train", "pretrain", "--out", out, "--resume", "--steps", "3", "--quiet"]) == 0
    assert "trained 3/3 steps" in capsys.readouterr().out
    assert main(["train", "pretrain", "--out", out, "--resume", "--quiet"]) == 0  # the new end was recorded
    assert "trained 3/3 steps" in capsys.readouterr().out
    assert main(["train", "pretrain", "--train", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_cli_builtin_data_method_and_bad_images(scenes, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["train", "pretrain", "--model", str(scenes / "model.json"), "--steps", "1", "--batch-size", "4", "--scenes-images", "8",
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "data" / "pretrain.json").is_file()
    # corrupt two images of the generated data: an error naming the file, or skipped and counted
    pairs = json.loads((out / "data" / "pretrain.json").read_text())
    (out / "data" / pairs[0]["image"]).write_bytes(b"")
    bad = ["train", "pretrain", "--model", str(scenes / "model.json"), "--train", str(out / "data" / "pretrain.json"), "--steps", "2",
           "--batch-size", "4", "--out", str(tmp_path / "c"), "--quiet"]
    assert main(bad) == 2
    assert pairs[0]["image"] in capsys.readouterr().err
    assert main(bad[:-1] + ["--overwrite", "--skip-bad-images", "--quiet"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_cli_decompression_bomb_is_a_bad_image(scenes, tmp_path, capsys):
    from test_data import _bomb_png

    pairs = json.loads((scenes / "pretrain.json").read_text())[:8]
    for p in pairs:
        p["image"] = str(scenes / p["image"])
    _bomb_png(tmp_path / "bomb.png")  # a header claiming 20000 x 20000 pixels
    pairs[3]["image"] = str(tmp_path / "bomb.png")
    (tmp_path / "ann.json").write_text(json.dumps(pairs))
    args = ["train", "pretrain", "--model", str(scenes / "model.json"), "--train", str(tmp_path / "ann.json"),
            "--images", str(scenes), "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet",
            "--allow-outside-root"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "too large" in err and "bomb.png" in err and "Traceback" not in err
    assert "20000 x 20000" in err and "annotation entry 3" in err and "--skip-bad-images" in err
    assert not (tmp_path / "run").exists()  # stopped before its first step: no run directory to trip over
    assert main(args + ["--overwrite", "--skip-bad-images"]) == 0
    assert "skipped 1 sample(s)" in capsys.readouterr().out


def _own_scenes(scenes, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    return data


def test_data_error_mid_run_writes_a_resumable_checkpoint(scenes, tmp_path, capsys, monkeypatch):
    """Every image turns bad after step 6 (no --skip-bad-images): exit 2 naming the file, the entry and the flag;
    the checkpoint of step 6 is written (--ckpt-every is 100); once the images are back, --resume finishes the run
    and gives the uninterrupted run's model bit for bit."""
    import vlprune.train as train_mod

    data = _own_scenes(scenes, tmp_path)
    args = ["train", "pretrain", "--model", str(data / "model.json"), "--train", str(data / "pretrain.json"),
            "--batch-size", "4", "--steps", "9", "--ckpt-every", "100", "--threads", "1", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    pngs = {p: p.read_bytes() for p in data.rglob("*.png")}
    assert len(pngs) >= 40
    plain = train_mod.train

    def breaks(cfg, out, **kw):
        def corrupt(step, record):
            if step == 6:
                for p in pngs:
                    p.write_bytes(b"not a png")
        return plain(cfg, out, callback=corrupt, **kw)

    monkeypatch.setattr(train_mod, "train", breaks)
    part = tmp_path / "part"
    capsys.readouterr()
    assert main(args + ["--out", str(part)]) == 2
    err = capsys.readouterr().err
    assert "not an image file" in err and "(annotation entry " in err and "--skip-bad-images" in err, err
    assert f"holds the checkpoint of step 6; once the cause is fixed, continue with: vlprune train pretrain --out {part} --resume" in err
    assert load_checkpoint(part)["step"] == 6 and not (part / "model").exists()
    monkeypatch.setattr(train_mod, "train", plain)
    for p, b in pngs.items():
        p.write_bytes(b)
    assert main(["train", "pretrain", "--out", str(part), "--resume", "--quiet"]) == 0
    a, b = params(tmp_path / "full"), params(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert json.loads((part / "model" / "config.json").read_text())["interrupted"] is False


def test_error_inside_a_step_keeps_the_last_checkpoint(scenes, tmp_path, monkeypatch):
    """An error in the middle of a step (the model between two steps) writes nothing: the newest checkpoint stays
    that of step 2 and the error says so."""
    from vlprune.tasks.pretrain import PretrainTask

    calls = []
    step = PretrainTask.step

    def fails(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("out of memory, say")
        return step(self, *a, **k)

    monkeypatch.setattr(PretrainTask, "step", fails)
    with pytest.raises(RuntimeError, match="out of memory") as e:
        train(cfg_for(scenes, steps=5, ckpt_every=2), tmp_path / "run")
    assert e.value.saved_step == 2 and load_checkpoint(tmp_path / "run")["step"] == 2


def test_a_data_error_at_start_up_leaves_no_run_directory(scenes, tmp_path, capsys):
    """A broken annotation file, or one whose images leave the image root, stops the run before the run
    directory exists: the same command runs once the file is fixed (no 'exists; use --overwrite')."""
    data = _own_scenes(scenes, tmp_path)
    pairs = json.loads((data / "pretrain.json").read_text())
    ann = tmp_path / "ann.json"
    out = tmp_path / "run"
    args = ["train", "pretrain", "--model", str(data / "model.json"), "--train", str(ann), "--images", str(data),
            "--batch-size", "4", "--steps", "1", "--out", str(out), "--quiet"]
    for broken, message in (([{"image": pairs[0]["image"]}] + pairs[1:], "caption"),
                            ([{**pairs[0], "image": "../elsewhere.png"}] + pairs[1:], "annotation entry 0: image path '../elsewhere.png' points outside"),
                            (pairs[:3], "3 samples over 1 process(es) give no full batch of 4 (--batch-size)")):
        ann.write_text(json.dumps(broken))
        assert main(args) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    ann.write_text(json.dumps(pairs))
    assert main(args) == 0


def test_unreadable_checkpoints_give_a_reason(tmp_path):
    """Empty: says so; garbage or a pickled object: a short reason, never torch's advice to retry with
    weights_only=False; a file without a step: not a training state."""
    from vlprune.checkpoint import read_state

    cases = {"empty.pt": (b"", "the file is empty (0 bytes)"),
             "garbage.pt": (bytes(range(256)) * 8, "not a PyTorch checkpoint file, or a damaged one"),
             "zip.pt": (b"PK\x03\x04" + bytes(100), "not a PyTorch checkpoint file, or a damaged one")}
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            read_state(tmp_path / name)
        assert str(e.value).startswith(f"cannot read checkpoint {tmp_path / name}: {reason}"), str(e.value)
        assert "weights_only" not in str(e.value) and len(str(e.value).splitlines()) == 1
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module: code, not data
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors and plain values \(torch.nn.modules"
                       r".linear.Linear\); vlprune reads checkpoints as data only") as e:
        read_state(tmp_path / "module.pt")
    assert "weights_only" not in str(e.value)
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    torch.save({"model": {}}, run / "checkpoint-3" / "state.pt")
    with pytest.raises(ValueError, match="not a vlprune training state"):
        load_checkpoint(run)
    (run / "checkpoint-3" / "state.pt").write_bytes(b"")
    assert main(["train", "pretrain", "--out", str(run), "--resume", "--quiet"]) == 2  # no train_config.json either


def test_save_total_limit_latest_and_old_run_directories(scenes, tmp_path, capsys):
    """--save-total-limit 2 keeps the two newest checkpoint-STEP/ directories and points latest at the newest; a
    run directory of the single-file layout (checkpoint.pt) still resumes, and its file goes once a newer
    checkpoint exists."""
    run = tmp_path / "run"
    train(cfg_for(scenes, steps=7, ckpt_every=2, save_total_limit=2), run)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    assert (run / "latest").read_text() == "checkpoint-7\n" and load_checkpoint(run)["step"] == 7
    meta = json.loads((run / "model" / "config.json").read_text())
    assert (meta["step"], meta["total_steps"], meta["interrupted"]) == (7, 7, False)
    old = tmp_path / "old"  # an earlier version's layout, interrupted at step 4

    def stop(step, record):
        if step == 4:
            signal.raise_signal(signal.SIGTERM)

    assert train(cfg_for(scenes, steps=7, ckpt_every=2), old, callback=stop)["interrupted"]
    os.replace(old / "checkpoint-4" / "state.pt", old / "checkpoint.pt")
    (old / "checkpoint-4").rmdir()
    (old / "latest").unlink()
    assert load_checkpoint(old)["step"] == 4
    train(cfg_for(scenes, steps=7, ckpt_every=2), old, resume=True)
    assert not (old / "checkpoint.pt").exists() and [p.name for p in old.glob("checkpoint-*")] == ["checkpoint-7"]
    a, b = params(run), params(old)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_interrupted_model_is_marked(scenes, tmp_path, caplog):
    def stop(step, record):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    run = tmp_path / "run"
    assert train(cfg_for(scenes, steps=4), run, callback=stop)["interrupted"]
    meta = json.loads((run / "model" / "config.json").read_text())
    assert (meta["step"], meta["total_steps"], meta["interrupted"]) == (2, 4, True)
    caplog.set_level("WARNING")
    assert main(["eval", "retrieval", "--checkpoint", str(run), "--test", str(scenes / "retrieval_test.json"),
                 "--images", str(scenes), "--k", "2", "--quiet"]) == 0
    assert "is the model of an interrupted run (step 2 of 4)" in caplog.text
    train(cfg_for(scenes, steps=4), run, resume=True)
    meta = json.loads((run / "model" / "config.json").read_text())
    assert (meta["step"], meta["interrupted"]) == (4, False)
