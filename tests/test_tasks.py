"""Downstream tasks through the CLI (in-process): every task fine-tunes from a pre-trained run and evaluates with
a JSON line; --method at evaluation changes the image tokens; evaluation leaves the checkpoint alone; LAPS as a
retrieval model; TiP's two stages and DynamicViT with their loss parts; bad inputs; DDP evaluation = one process."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlprune
from vlprune.cli import main
from vlprune.data.scenes import generate
from vlprune.tasks.classify import VQATask
from vlprune.tasks.metrics import normalize_answer
from vlprune.train import TrainConfig, train

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "heads": 4, "mlp_dim": 37}
TEXT = {"vocab_size": 160, "width": 32, "layers": 1, "heads": 4, "mlp_dim": 37, "max_len": 24}
ALBEF = {"arch": "albef", "vision": VISION, "text": TEXT, "fusion_layers": 1, "embed_dim": 16, "queue_size": 16,
         "use_momentum": True}
VILT = {"arch": "vilt", "vision": VISION, "text": {**TEXT, "layers": 0}, "fusion_layers": 0}
METRICS = {"vqa": ["accuracy"], "ve": ["accuracy"], "nlvr2": ["accuracy"],
           "retrieval": ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]}
TOKENS = 1 + 16  # [CLS] + (32 / 8)^2 patches


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    generate(root, images=24, seed=3, image_size=32)
    (root / "albef.json").write_text(json.dumps(ALBEF))
    (root / "vilt.json").write_text(json.dumps(VILT))
    train(TrainConfig(model=str(root / "albef.json"), train=str(root / "pretrain.json"), steps=2, batch_size=4,
                      seed=1), root / "pt")
    return root


def run_cli(capsys, *args) -> tuple:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def finetune(scenes, capsys, task, out, *extra, steps=2):
    extra = list(extra)
    if "--init" not in extra and "--model" not in extra:
        extra = ["--init", scenes / "pt"] + extra
    rc, text, err = run_cli(capsys, "train", task, "--train", scenes / f"{task}_train.json", "--images", scenes,
                            "--steps", steps, "--batch-size", 4, "--log-every", 1, "--out", out, "--quiet", *extra)
    assert rc == 0, err
    return text


def evaluate(scenes, capsys, task, run, *extra) -> dict:
    rc, text, err = run_cli(capsys, "eval", task, "--checkpoint", run, "--test", scenes / f"{task}_test.json",
                            "--images", scenes, "--json", "--quiet", *extra)
    assert rc == 0, err
    return json.loads(text.strip().splitlines()[-1])


def rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(scenes, tmp_path_factory):
    return {"dir": tmp_path_factory.mktemp("runs")}


def run_of(scenes, capsys, runs, task):
    if task not in runs:
        out = runs["dir"] / task
        extra = ["--val", scenes / f"{task}_test.json"] if task in ("vqa", "ve") else []
        extra += ["--answers", scenes / "answer_list.json"] if task == "vqa" else []
        finetune(scenes, capsys, task, out, *extra)
        runs[task] = out
    return runs[task]


@pytest.mark.parametrize("task", ["vqa", "ve", "nlvr2", "retrieval"])
def test_every_task_trains_and_evaluates(scenes, capsys, runs, task):
    run = run_of(scenes, capsys, runs, task)
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["task"] == task
    if task != "retrieval":
        assert task in meta["heads"]
    res = evaluate(scenes, capsys, task, run)
    n_test = len(json.loads((scenes / f"{task}_test.json").read_text()))
    assert set(METRICS[task]) | {"method", "examples", "gflops", "image_tokens"} <= set(res)
    assert res["method"] == "none" and res["examples"] == n_test
    assert all(0.0 <= res[m] <= 100.0 for m in METRICS[task])
    assert res["image_tokens"] == TOKENS and res["gflops"] > 0
    if task == "vqa":
        assert meta["answers"] == json.loads((run / "answer_vocab.json").read_text())
        assert meta["answers"] == [normalize_answer(a) for a in json.loads((scenes / "answer_list.json").read_text())]
        assert len(model_head_rows(run, "vqa")) == len(meta["answers"])
        evaluate(scenes, capsys, task, run, "--predictions", run.parent / "pred.json")
        pred = json.loads((run.parent / "pred.json").read_text())
        qids = [e["question_id"] for e in json.loads((scenes / "vqa_test.json").read_text())]
        assert [p["question_id"] for p in pred] == qids and all(p["answer"] in meta["answers"] for p in pred)
    if task in ("vqa", "ve"):  # --val: evaluated after training, logged
        val = rows(run)[-1]
        assert val["val"]["accuracy"] == pytest.approx(res["accuracy"]) and val["val_examples"] == n_test


def model_head_rows(run, task):
    w = load_file(str(run / "model" / "model.safetensors"))
    return w[f"task_heads.{task}.net.3.bias"]


def test_eval_method_changes_image_tokens(scenes, capsys, runs):
    run = run_of(scenes, capsys, runs, "vqa")
    base = evaluate(scenes, capsys, "vqa", run)
    evit = evaluate(scenes, capsys, "vqa", run, "--method", "evit", "--layers", "2", "--keep", "0.5")
    trips = evaluate(scenes, capsys, "vqa", run, "--method", "trips", "--layers", "2", "--keep", "0.5")
    tome = evaluate(scenes, capsys, "vqa", run, "--method", "tome", "--layers", "1,2", "--option", "r=3")
    assert base["image_tokens"] == TOKENS
    assert evit["method"] == "evit" and evit["image_tokens"] == 1 + math.ceil(0.5 * 16) + 1  # kept + fused token
    assert trips["method"] == "trips" and trips["image_tokens"] == 1 + math.ceil(0.5 * 16) + 1
    assert tome["image_tokens"] == TOKENS - 6
    assert evit["gflops"] < base["gflops"] and tome["gflops"] < base["gflops"]
    ret = run_of(scenes, capsys, runs, "retrieval")
    r = evaluate(scenes, capsys, "retrieval", ret, "--method", "trips", "--layers", "2", "--keep", "0.5", "--k", "1")
    n_img = len(json.loads((scenes / "retrieval_test.json").read_text()))
    assert r["image_tokens"] == 10 and r["itm_pairs"] == n_img + 2 * n_img  # k = 1: one pair per query (2 captions/image)


def tree_hashes(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_eval_leaves_checkpoint_unchanged(scenes, capsys, runs):
    run = run_of(scenes, capsys, runs, "ve")
    before = tree_hashes(run)
    evaluate(scenes, capsys, "ve", run)
    evaluate(scenes, capsys, "ve", run, "--method", "evit", "--layers", "2", "--keep", "0.5")
    assert tree_hashes(run) == before


def test_laps_retrieval(scenes, capsys, tmp_path):
    text = finetune(scenes, capsys, "retrieval", tmp_path / "laps", "--method", "laps")
    assert "triplet" in text and "ratio" in text
    r = rows(tmp_path / "laps")
    assert all(math.isfinite(x["triplet"]) and x["ratio"] >= 0 for x in r)
    res = evaluate(scenes, capsys, "retrieval", tmp_path / "laps")
    assert res["method"] == "laps" and "r_sum" in res and 0 <= res["r_sum"] <= 600
    assert res["slimmed_tokens"] == 1 + math.floor(0.4 * 0.5 * 16) + 1


def test_tip_two_stages_on_single_stream(scenes, capsys, tmp_path):
    teacher, s1, s2 = tmp_path / "teacher", tmp_path / "s1", tmp_path / "s2"
    finetune(scenes, capsys, "vqa", teacher, "--model", scenes / "vilt.json")
    finetune(scenes, capsys, "vqa", s1, "--init", teacher, "--method", "tip", "--teacher", teacher, "--stage", 1)
    finetune(scenes, capsys, "vqa", s2, "--init", s1, "--method", "tip", "--teacher", teacher, "--stage", 2)
    r1, r2 = rows(s1), rows(s2)
    for r in r1 + r2:
        assert {"vqa", "sparsity", "contrast", "distill"} <= set(r)
    assert all("continuity" not in r for r in r1) and all("continuity" in r for r in r2)  # lam = 0, then 1
    w0, w1, w2 = (load_file(str(d / "model" / "model.safetensors")) for d in (teacher, s1, s2))
    joint = "layers.1.attn.qkv.weight"
    assert torch.equal(w0[joint], w1[joint])  # stage 1: backbone frozen
    assert not torch.equal(w0["task_heads.vqa.net.3.weight"], w1["task_heads.vqa.net.3.weight"])  # head trains
    assert not torch.equal(w1[joint], w2[joint])  # stage 2: the cross-modal (joint) layers train
    assert torch.equal(w1["image_embeddings.patch_embed.weight"], w2["image_embeddings.patch_embed.weight"])
    pruner = [k for k in w1 if ".reducer.pruner." in k][0]
    assert not torch.equal(w1[pruner], w2[pruner])
    res = evaluate(scenes, capsys, "vqa", s2)
    assert res["method"] == "tip" and res["image_tokens"] < TOKENS


def test_dynamicvit_finetune_losses(scenes, capsys, runs, tmp_path):
    teacher = run_of(scenes, capsys, runs, "ve")
    finetune(scenes, capsys, "ve", tmp_path / "dv", "--init", teacher, "--method", "dynamicvit", "--layers", 2,
             "--teacher", teacher)
    for r in rows(tmp_path / "dv"):
        assert {"ve", "ratio", "cls_distill", "token_distill"} <= set(r)
        assert r["cls_distill"] > -1e-6 and r["token_distill"] > 0 and r["ratio"] >= 0  # KL >= 0 up to rounding
    res = evaluate(scenes, capsys, "ve", tmp_path / "dv")
    assert res["method"] == "dynamicvit" and res["image_tokens"] == 1 + math.floor(0.7 * 16)


def test_builtin_scenes_data_without_files(scenes, capsys, tmp_path):
    out = tmp_path / "ve"
    rc, _, err = run_cli(capsys, "train", "ve", "--model", scenes / "albef.json", "--scenes-images", 8, "--steps", 1,
                         "--batch-size", 4, "--out", out, "--quiet")
    assert rc == 0, err
    rc, text, err = run_cli(capsys, "eval", "ve", "--checkpoint", out, "--json", "--quiet")  # the run's test split
    assert rc == 0, err
    assert json.loads(text.strip().splitlines()[-1])["examples"] == len(json.loads((out / "data" / "ve_test.json").read_text()))


def test_bad_inputs(scenes, capsys, runs, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["eval", "segmentation", "--checkpoint", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    ve = run_of(scenes, capsys, runs, "ve")
    cases = [
        (["eval", "ve", "--checkpoint", tmp_path / "nothing", "--test", scenes / "ve_test.json"], "checkpoint not found"),
        (["eval", "ve", "--checkpoint", tmp_path, "--test", scenes / "ve_test.json"], "neither a vlprune run"),
        (["eval", "ve", "--checkpoint", ve, "--test", scenes / "vqa_test.json"], "has no field 'sentence'"),
        (["eval", "ve", "--checkpoint", ve, "--test", tmp_path / "missing.json"], "missing.json"),
        (["eval", "vqa", "--checkpoint", ve, "--test", scenes / "vqa_test.json"],
         f"the checkpoint {ve / 'model'} was trained for 've': it can be evaluated on ve, not vqa"),
        (["eval", "ve", "--checkpoint", ve, "--test", scenes / "ve_test.json", "--keep", "0.5"], "need --method"),
        (["eval", "ve", "--checkpoint", ve, "--test", scenes / "ve_test.json", "--method", "evit", "--layers", "2", "--keep", "1.5"], "1.5"),
        (["eval", "retrieval", "--checkpoint", ve, "--predictions", tmp_path / "p.json"], "--predictions is for"),
        (["train", "ve", "--init", ve, "--stage", "1", "--steps", "1", "--out", tmp_path / "x"], "learned method"),
        (["train", "retrieval", "--init", ve, "--teacher", ve, "--out", tmp_path / "y"], "--teacher does not apply"),
        (["train", "ve", "--init", ve, "--model", "tiny", "--out", tmp_path / "z"], "not both"),
    ]
    for args, msg in cases:
        rc, _, err = run_cli(capsys, *args)
        assert rc == 2 and msg in err, (args, err)


def test_eval_refuses_a_checkpoint_not_trained_for_the_task(scenes, capsys, runs):
    """A VQA run has no retrieval training (its ITC/ITM heads come untouched from pre-training at best) and a
    pre-training run no VQA head: both refused, naming the tasks the checkpoint has. A pre-training run is
    evaluated on retrieval (zero-shot), as ALBEF does."""
    from vlprune.commands.eval import checkpoint_tasks

    vqa = run_of(scenes, capsys, runs, "vqa")
    rc, _, err = run_cli(capsys, "eval", "retrieval", "--checkpoint", vqa, "--test", scenes / "retrieval_test.json",
                         "--images", scenes, "--quiet")
    assert rc == 2 and "was trained for 'vqa': it can be evaluated on vqa, not retrieval" in err, err
    assert f"vlprune train retrieval --init {vqa}" in err
    rc, _, err = run_cli(capsys, "eval", "vqa", "--checkpoint", scenes / "pt", "--test", scenes / "vqa_test.json",
                         "--images", scenes, "--quiet")
    assert rc == 2 and "was trained for 'pretrain': it can be evaluated on retrieval, not vqa" in err, err
    res = evaluate(scenes, capsys, "retrieval", scenes / "pt", "--k", "2")
    assert res["examples"] == len(json.loads((scenes / "retrieval_test.json").read_text()))
    assert checkpoint_tasks({"model": {"arch": "albef"}, "heads": {"vqa": 5}}) == ["retrieval", "vqa"]
    assert checkpoint_tasks({"model": {"arch": "vilt"}, "heads": {}}) == []


def test_eval_bad_images(scenes, capsys, runs, tmp_path):
    """A bad test image stops eval naming the file, the entry and --skip-bad-images; with the flag the examples
    of that image are skipped and counted; a decompression bomb (--max-image-pixels) is a bad image; a path
    outside the image root is refused unless --allow-outside-root."""
    import shutil

    from test_data import _bomb_png

    ve = run_of(scenes, capsys, runs, "ve")
    entries = json.loads((scenes / "ve_test.json").read_text())
    root = tmp_path / "images"
    for e in entries:
        (root / e["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scenes / e["image"], root / e["image"])
    test = tmp_path / "ve_test.json"
    test.write_text(json.dumps(entries))
    args = ["eval", "ve", "--checkpoint", ve, "--test", test, "--images", root, "--json", "--quiet"]
    bad = entries[2]["image"]
    (root / bad).write_bytes(b"garbage")
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and bad in err and "not an image file" in err and "--skip-bad-images" in err, err
    first = min(i for i, e in enumerate(entries) if e["image"] == bad)
    assert f"(annotation entry {first};" in err
    rc, out, err = run_cli(capsys, *args, "--skip-bad-images")
    res = json.loads(out.strip().splitlines()[-1])
    n_bad = sum(e["image"] == bad for e in entries)
    assert rc == 0 and res["skipped"] == n_bad and res["examples"] == len(entries) - n_bad
    _bomb_png(root / bad)
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and "20000 x 20000" in err and bad in err
    rc, _, err = run_cli(capsys, *args, "--skip-bad-images", "--max-image-pixels", "10")
    assert rc == 2 and "no example" in err and f"({len(entries)} skipped)" in err
    good = [e for e in entries if e["image"] != bad]
    shutil.copy(scenes / good[0]["image"], tmp_path / "outside.png")
    test.write_text(json.dumps([{**good[0], "image": "../outside.png"}] + good[1:2]))
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and "annotation entry 0: image path '../outside.png' points outside the image root" in err, err
    rc, out, err = run_cli(capsys, *args, "--allow-outside-root")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["examples"] == 2, err
    ret = run_of(scenes, capsys, runs, "retrieval")  # retrieval reads its images itself: the same message
    rc, _, err = run_cli(capsys, "eval", "retrieval", "--checkpoint", ret, "--test", scenes / "retrieval_test.json",
                         "--images", root, "--quiet")
    assert rc == 2 and "(annotation entry " in err and "--skip-bad-images" in err, err


def _ddp_eval(rank: int, world: int, jobs, outdir: str) -> None:
    import contextlib
    import io
    import os

    torch.set_num_threads(1)
    for name, port, args in jobs:  # a fresh port per process group (re-using one can hang the second init)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(args)
        Path(outdir, f"{name}.{rank}").write_text(f"{rc}\n{buf.getvalue()}")


def test_ddp_eval_equals_one_process(scenes, capsys, runs, tmp_path):
    """Two gloo processes split the examples (VQA) / re-ranking queries (retrieval) and gather: same metrics."""
    import socket

    import torch.multiprocessing as mp

    jobs, single = [], {}
    for task in ("vqa", "retrieval"):
        run = run_of(scenes, capsys, runs, task)
        args = ["eval", task, "--checkpoint", str(run), "--test", str(scenes / f"{task}_test.json"), "--images",
                str(scenes), "--json", "--quiet", "--batch-size", "3"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            jobs.append((task, s.getsockname()[1], args))
        single[task] = evaluate(scenes, capsys, task, run, "--batch-size", "3")
    mp.spawn(_ddp_eval, args=(2, jobs, str(tmp_path)), nprocs=2, join=True)
    for task, _, _ in jobs:
        rc, *lines = (tmp_path / f"{task}.0").read_text().splitlines()
        assert rc == "0"
        got = json.loads(lines[-1])
        keys = METRICS[task] + ["examples", "image_tokens", "gflops"]
        assert {k: got[k] for k in keys} == pytest.approx({k: single[task][k] for k in keys})
        rc1, *rest = (tmp_path / f"{task}.1").read_text().splitlines()
        assert rc1 == "0" and rest == []  # only rank 0 prints


def test_vqa_soft_score_loss_against_naive():
    task = VQATask()
    task.vocab = {"red": 0, "blue": 1, "2": 2}
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    answers = [["red"] * 2 + ["blue"] * 7 + ["green"], ["two"]]  # 10 annotators; one answer ("two" -> "2")
    want_t = [[2 / 3, 1.0, 0.0], [0.0, 0.0, 1.0]]
    naive = 0.0
    for i in range(2):
        for j in range(3):
            p, t = torch.sigmoid(logits[i, j]).item(), want_t[i][j]
            naive -= t * math.log(p) + (1 - t) * math.log(1 - p)
    got = task.task_loss(logits, {"answers": answers})
    assert got.item() == pytest.approx(naive / 6 * 3, rel=1e-5)  # mean BCE x vocabulary size


def test_evaluate_run_is_what_vlprune_eval_reports(scenes, capsys, runs):
    """The API the demo and scripts call gives the numbers `vlprune eval --json` prints (one evaluation path)."""
    from vlprune.tasks.evaluation import evaluate_run

    run = run_of(scenes, capsys, runs, "vqa")
    cli = evaluate(scenes, capsys, "vqa", run, "--method", "trips", "--layers", "2", "--keep", "0.5")
    r = evaluate_run(run, "vqa", scenes / "vqa_test.json", method=vlprune.ReduceConfig("trips", layers=(2,), keep=0.5),
                     images=scenes)
    assert r.metrics["accuracy"] == cli["accuracy"] and r.info["examples"] == cli["examples"]
    assert r.info["gflops"] == cli["gflops"] and r.info["image_tokens"] == cli["image_tokens"]
    assert r.method.to_dict() == cli["method_config"]
    none = evaluate_run(run, "vqa", scenes / "vqa_test.json", method=None, images=scenes)
    assert none.method is None and none.info["image_tokens"] == TOKENS and none.info["gflops"] > r.info["gflops"]
    with pytest.raises(ValueError, match="can be evaluated on vqa, not ve"):
        evaluate_run(run, "ve", scenes / "ve_test.json", images=scenes)
