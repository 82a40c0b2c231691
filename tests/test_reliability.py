"""Nothing a user owns is deleted or silently changed (issue 26): --overwrite only empties directories vlprune
wrote and never one holding an input; a resume is bound to the files the run started on; non-finite numbers stop
with exit code 2; the run directory's messages say what to do. Tiny model, 1 thread, a few steps each; one
trained run is shared (copied where a test changes it)."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from vlprune.checkpoint import load_checkpoint
from vlprune.cli import main
from vlprune.data.scenes import generate
from vlprune.train import TrainConfig, train

from test_train import MODEL  # the tiny model of the trainer's tests (conftest: 1 thread)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel") / "sc"
    generate(root, images=24, seed=3, image_size=32)
    (root / "model.json").write_text(json.dumps(MODEL))
    return root


def args_for(data, out, *extra, steps=2):
    return ["train", "pretrain", "--model", str(data / "model.json"), "--train", str(data / "pretrain.json"),
            "--images", str(data), "--steps", str(steps), "--batch-size", "4", "--ckpt-every", "1", "--log-every", "1",
            "--threads", "1", "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("relrun") / "run"
    assert main(args_for(data, out)) == 0
    return out


def own(src, tmp_path, name):
    dest = tmp_path / name
    shutil.copytree(src, dest)
    return dest


def err(capsys):
    return capsys.readouterr().err


# ---- --overwrite ------------------------------------------------------------------------------------------------
def test_overwrite_never_deletes_the_init_run_or_the_training_data(data, run, tmp_path, capsys):
    x = own(run, tmp_path, "x")
    before = sorted(p.name for p in x.rglob("*"))
    a = ["train", "pretrain", "--init", str(x), "--train", str(data / "pretrain.json"), "--images", str(data),
         "--steps", "1", "--batch-size", "4", "--threads", "1", "--quiet", "--out", str(x), "--overwrite"]
    assert main(a) == 2
    assert f"holds the input --init {x}" in err(capsys)
    assert sorted(p.name for p in x.rglob("*")) == before and load_checkpoint(x)["step"] == 2
    d = own(data, tmp_path, "d")  # the folder holding the annotation file and the images
    assert main(args_for(d, d, "--overwrite")) == 2
    assert "holds the input --train" in err(capsys) and (d / "pretrain.json").is_file() and (d / "images").is_dir()
    # --teacher (and any input) reached through a symbolic link or a relative path is found too
    from vlprune.rundir import check_overwrite
    from vlprune.train_data import input_paths

    (tmp_path / "link").symlink_to(x, target_is_directory=True)
    cfg = TrainConfig(task="vqa", task_options={"teacher": str(tmp_path / "link")})
    with pytest.raises(ValueError, match="holds the input --teacher"):
        check_overwrite(x, "run", input_paths(cfg))


def test_overwrite_refuses_directories_vlprune_did_not_write(data, tmp_path, capsys):
    from vlprune.demo.pipeline import run_demo

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(args_for(data, foreign)) == 2
    assert "--overwrite" not in err(capsys)  # no advice to delete what vlprune did not write
    assert main(args_for(data, foreign, "--overwrite")) == 2
    assert "refuses to empty" in err(capsys)
    assert main(["data", "scenes", "--out", str(foreign), "--images", "4", "--overwrite", "--quiet"]) == 2
    assert "refuses to empty" in err(capsys)
    with pytest.raises(FileExistsError, match="refuses to empty"):
        run_demo(foreign, overwrite=True, quiet=True)
    assert main(["demo", "--quick", "--threads", "1", "--quiet", "--out", str(foreign)]) == 2
    assert "holds no demo run" in (e := err(capsys)) and "--overwrite" not in e
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # what vlprune wrote may be replaced: scenes data twice, a run over its own earlier run
    sc = tmp_path / "sc"
    for _ in range(2):
        assert main(["data", "scenes", "--out", str(sc), "--images", "4", "--overwrite", "--quiet"]) == 0
    assert main(args_for(data, tmp_path / "r", steps=1)) == 0
    assert main(args_for(data, tmp_path / "r", "--overwrite", steps=1)) == 0
    assert main(args_for(data, sc, "--overwrite", steps=1)) == 2 and "vlprune data directory" in err(capsys)


# ---- resume bound to its inputs -----------------------------------------------------------------------------------
def test_resume_is_bound_to_resolved_paths_not_the_working_directory(data, tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    own(data, a, "sc"), own(data, b, "sc")
    rows = json.loads((b / "sc" / "pretrain.json").read_text())
    (b / "sc" / "pretrain.json").write_text(json.dumps(rows[::-1]))  # b's own sc/ holds other data
    monkeypatch.chdir(a)
    rel = ["train", "pretrain", "--model", "sc/model.json", "--train", "sc/pretrain.json", "--images", "sc",
           "--batch-size", "4", "--ckpt-every", "1", "--threads", "1", "--quiet"]
    assert main(rel + ["--steps", "1", "--out", "run"]) == 0
    saved = json.loads((a / "run" / "train_config.json").read_text())
    assert saved["train"] == os.path.realpath(a / "sc" / "pretrain.json") and saved["images"] == os.path.realpath(a / "sc")
    monkeypatch.chdir(b)
    assert main(["train", "pretrain", "--out", str(a / "run"), "--resume", "--steps", "2", "--quiet"]) == 0  # a's data
    assert json.loads((a / "run" / "inputs.json").read_text())["files"][0]["path"] == saved["train"]
    assert main(rel + ["--steps", "3", "--out", str(a / "run"), "--resume"]) == 2  # b's sc/ typed: refused
    assert "--train: saved" in err(capsys)


def test_resume_refuses_a_changed_annotation_file_unless_accepted(data, tmp_path, capsys):
    d = own(data, tmp_path, "d")
    out = tmp_path / "run"
    assert main(args_for(d, out, steps=1)) == 0
    rows = json.loads((d / "pretrain.json").read_text())
    (d / "pretrain.json").write_text(json.dumps(rows[1:] + rows[:1], indent=1))  # shuffled: the same size
    resume = ["train", "pretrain", "--out", str(out), "--resume", "--steps", "2", "--quiet"]
    assert main(resume) == 2
    assert f"{os.path.realpath(d / 'pretrain.json')} changed since the run started (content differs)" in err(capsys)
    assert load_checkpoint(out)["step"] == 1
    assert main(resume + ["--accept-changed-inputs"]) == 0 and load_checkpoint(out)["step"] == 2
    assert not json.loads((out / "train_config.json").read_text())["accept_changed_inputs"]


def test_a_run_killed_before_its_first_checkpoint_says_to_use_overwrite(data, run, tmp_path, capsys):
    x = own(run, tmp_path, "x")  # as a kill -9 before the first checkpoint leaves it: no checkpoint, no model
    for p in list(x.glob("checkpoint-*")) + [x / "model"]:
        shutil.rmtree(p)
    (x / "latest").unlink()
    assert main(["train", "pretrain", "--out", str(x), "--resume", "--quiet"]) == 2
    assert "stopped before its first checkpoint" in (e := err(capsys)) and "--overwrite" in e
    assert main(args_for(data, x)) == 2
    assert "stopped before its first checkpoint" in (e := err(capsys)) and "use --overwrite" in e
    assert main(args_for(data, x, "--overwrite", steps=1)) == 0


# ---- non-finite numbers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, named", [(["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"),
                                          (["--lr-mult", "vision=nan"], "--lr-mult vision"),
                                          (["--lr-mult", "vision=inf"], "--lr-mult vision"),
                                          (["--seed", str(10**30)], "seed")])
def test_nonfinite_learning_rates_and_huge_seeds_are_refused_before_the_run(data, tmp_path, capsys, flags, named):
    assert main(args_for(data, tmp_path / "r", *flags)) == 2
    assert named in err(capsys) and not (tmp_path / "r").exists()


def test_a_nonfinite_loss_stops_with_exit_2_naming_the_step_and_keeps_the_checkpoint(data, tmp_path, capsys,
                                                                                      monkeypatch):
    from vlprune.tasks.pretrain import PretrainTask

    calls, step = [], PretrainTask.step

    def nan_at_4(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) == 4 else out

    monkeypatch.setattr(PretrainTask, "step", nan_at_4)
    out = tmp_path / "r"
    assert main(args_for(data, out, "--ckpt-every", "2", steps=6)) == 2
    assert "not finite (NaN or infinite) at step 4" in (e := err(capsys)) and "checkpoint (step 2)" in e
    state = load_checkpoint(out)
    assert state["step"] == 2 and not (out / "model").exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    monkeypatch.undo()
    assert main(args_for(data, tmp_path / "big", "--lr", "1e6", "--warmup", "0", steps=6)) == 2  # real divergence
    assert "step " in (e := err(capsys)) and "lower --lr" in e


def test_eval_refuses_a_model_with_nonfinite_weights(data, run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    x = own(run, tmp_path, "x")
    w = load_file(str(x / "model" / "model.safetensors"))
    name = sorted(k for k in w if w[k].is_floating_point())[0]
    w[name] = torch.full_like(w[name], float("nan"))
    save_file(w, str(x / "model" / "model.safetensors"))
    assert main(["eval", "retrieval", "--checkpoint", str(x), "--test", str(data / "retrieval_test.json"),
                 "--threads", "1", "--quiet"]) == 2
    assert f"non-finite weights (NaN or infinity) in {name}" in err(capsys)


# ---- outputs that would overwrite --------------------------------------------------------------------------------
def test_predictions_never_overwrite_silently_nor_the_checkpoint(data, run, tmp_path, capsys):
    preds = tmp_path / "preds.json"
    preds.write_text("mine")
    base = ["eval", "vqa", "--checkpoint", str(run), "--test", str(data / "vqa_test.json"), "--quiet"]
    assert main(base + ["--predictions", str(preds)]) == 2
    assert "pass --overwrite-predictions" in err(capsys) and preds.read_text() == "mine"
    own_weights = run / "model" / "model.safetensors"
    size = own_weights.stat().st_size
    assert main(base + ["--predictions", str(own_weights), "--overwrite-predictions"]) == 2
    assert "is (or is inside) the input --checkpoint" in err(capsys) and own_weights.stat().st_size == size


def test_disk_full_during_a_checkpoint_is_named_and_the_previous_one_kept(tmp_path, monkeypatch):
    import errno

    from vlprune import fileio
    from vlprune.checkpoint import save_checkpoint

    state = {"model": {"w": torch.zeros(4)}, "optimizer": {}, "scheduler": {}, "micro": 0, "skipped": 0, "rng": {}}
    save_checkpoint({**state, "step": 1}, tmp_path)
    opened = fileio._open

    class Full:  # a file system that fills up after 300 bytes
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 300:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(fileio, "_open", lambda fd: Full(opened(fd)))
    with pytest.raises(fileio.DiskFullError, match="disk full.*step 2.*checkpoint-1 is kept"):
        save_checkpoint({**state, "step": 2, "model": {"w": torch.zeros(1000)}}, tmp_path)
    assert load_checkpoint(tmp_path)["step"] == 1 and not list(tmp_path.glob(".*.tmp"))


# ---- metrics across a resume ------------------------------------------------------------------------------------------
def test_metrics_rows_after_a_resume_equal_an_uninterrupted_runs(data, tmp_path):
    cfg = TrainConfig(model=str(data / "model.json"), train=str(data / "pretrain.json"), images=str(data),
                      batch_size=4, steps=6, log_every=3, ckpt_every=100, seed=1, lr=5e-4)
    train(cfg, tmp_path / "full")

    def kill(step, record):
        if step == 4:  # mid-row: the row of step 6 averages steps 4 to 6
            signal.raise_signal(signal.SIGTERM)

    assert train(cfg, tmp_path / "part", callback=kill)["interrupted"]
    train(cfg, tmp_path / "part", resume=True)
    skip = ("time", "samples_per_s")

    def rows(run):
        return [{k: v for k, v in json.loads(l).items() if k not in skip}
                for l in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "part") == rows(tmp_path / "full") and len(rows(tmp_path / "full")) == 2


# ---- input errors name their file or sample and exit 2 ----------------------------------------------------------------
def test_input_errors_name_their_file(data, run, tmp_path, capsys):
    x = own(run, tmp_path, "x")  # a checkpoint of another version (no "micro")
    state_file = x / (x / "latest").read_text().strip() / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["micro"]
    torch.save(state, state_file)
    assert main(["train", "pretrain", "--out", str(x), "--resume", "--steps", "3", "--quiet"]) == 2
    assert str(state_file) in (e := err(capsys)) and "'micro'" in e
    y = own(run, tmp_path, "y")
    (y / "train_config.json").write_text('{"task": "pretrain", ')
    assert main(["train", "pretrain", "--out", str(y), "--resume", "--quiet"]) == 2
    assert "train_config.json: malformed JSON" in err(capsys)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    a = args_for(data, tmp_path / "r")
    a[a.index("--train") + 1] = str(deep)
    assert main(a) == 2 and f"{deep}: JSON nested too deeply" in err(capsys)
    rows = json.loads((data / "pretrain.json").read_text())
    nul = tmp_path / "nul.json"
    nul.write_text(json.dumps([{**rows[0], "image": "images/a\u0000.png"}] + rows[1:]))
    a[a.index("--train") + 1] = str(nul)
    assert main(a) == 2 and "annotation entry 0" in (e := err(capsys)) and "NUL byte" in e
    assert main(["info", "--threads", "100000"]) == 2 and "--threads must be at most" in err(capsys)


def test_bad_shard_members_name_the_sample_and_manifest_refuses_broken_shards(data, tmp_path, capsys):
    import io
    import tarfile

    from vlprune.data.shard_dataset import shard_texts
    from vlprune.data.shards import write_shards
    from vlprune.data.formats import load_pretrain

    d = tmp_path / "sh"
    write_shards(load_pretrain(data / "pretrain.json")[:4], data, d, 4)
    png = next((data / "images").glob("*.png")).read_bytes()
    with tarfile.open(d / "bad.tar", "w") as tar:
        for name, body in (("000000009.png", png), ("000000009.txt", b"\xff\xfe caption")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    assert main(["data", "manifest", str(d / "{000000,bad}.tar"), "--overwrite", "--quiet"]) == 0
    with pytest.raises(ValueError, match=r"bad.tar:000000009: its .txt member is not UTF-8"):
        shard_texts(str(d / "{000000,bad}.tar"))
    good = (d / "000000.tar").read_bytes()
    (d / "empty.tar").write_bytes(b"")
    (d / "text.tar").write_text("not a tar file\n" * 100)
    (d / "cut.tar").write_bytes(good[: len(good) // 2])
    for name, why in (("empty", "empty"), ("text", "not a tar archive"), ("cut", "truncated")):
        assert main(["data", "manifest", str(d / f"{{000000,{name}}}.tar"), "--overwrite", "--quiet"]) == 2
        assert f"{name}.tar: " in (e := err(capsys)) and why in e and "no manifest was written" in e


def test_a_bad_image_read_by_a_worker_shows_no_traceback_without_debug(data, tmp_path, capsys):
    d = own(data, tmp_path, "d")
    rows = json.loads((d / "pretrain.json").read_text())
    for r in rows:
        (d / r["image"]).write_bytes(b"not a png")
    assert main(args_for(d, tmp_path / "r", "--workers", "1")) == 2
    e = err(capsys)
    assert "not an image file" in e and "Traceback" not in e and "DataLoader worker" not in e
