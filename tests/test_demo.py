"""The demo: the quick profile end to end, its cache (skip / redo / resume), --overwrite, the operating points."""

import json
import shutil
import signal
from dataclasses import replace

import pytest

from vlprune.checkpoint import has_checkpoint
from vlprune.cli import main
from vlprune.demo import QUICK, Recipe, run_demo
from vlprune.demo.profiles import DEFAULT, FULL, METHODS, model_config, point, validate
from vlprune.demo.stages import DONE


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "q"
    assert main(["demo", "--quick", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    return out


def test_quick_demo_report(quick, capsys):
    report = (quick / "report.md").read_text()
    for section in ("## What the numbers say", "## Setup", "## Main table", "## Accuracy against cost",
                    "## Paired tests", "## Which patches are kept", "## Training runs", "## Wall time per stage"):
        assert section in report
    assert "Smoke run (quick profile)" in report and "(smoke run)" in report
    assert "| blind | image replaced by grey |" in report and "| chance | uniform over" in report
    assert "| majority | always" in report and "| trips | evit | at inference | 0.25 |" in report
    html = (quick / "report.html").read_text()
    assert "<h2>Paired tests</h2>" in html and "curve_gflops.png" in html
    for f in ("report/curve_gflops.png", "report/curve_throughput.png", "overlays/overlay_trips.png",
              "overlays/overlay_evit.png"):
        assert (quick / f).stat().st_size > 1000
    res = json.loads((quick / "results.json").read_text())
    assert res["environment"]["torch_threads"] == 1 and "OMP_NUM_THREADS" in res["environment"]["env"]
    rows = {(r["method"], r["setup"]): r for r in res["rows"]}
    none, trips = rows[("none", "fine-tuned unpruned")], rows[("trips", "at inference")]
    assert trips["image_tokens"] < none["image_tokens"] and trips["gflops_image"] < none["gflops_image"]
    assert none["survival"] == 1.0 and 0 <= trips["survival"] <= 1
    assert none["vqa_low"] <= none["vqa_acc"] <= none["vqa_high"]
    assert 0 < rows[("chance", f"uniform over {res['baselines']['answers']} answers")]["r_mean"] < 100
    assert {r["method"] for r in res["sweep"]} == set(METHODS) | {"lowres"}
    assert len(res["sweep"]) == len(QUICK.sweep) * (len(METHODS) + 1)
    assert all(len(v["scores"]) == v["examples"] for v in res["vqa"].values())
    assert 2 <= len(res["sentences"]) <= 5 and res["informative"] in (True, False)
    # a finished training stage keeps its model and tokenizer, not the optimiser checkpoint
    for run in ("vqa-none", "vqa-trips", "vqa-blind", "retrieval-none"):
        assert (quick / run / "model" / "config.json").is_file() and not has_checkpoint(quick / run)
    blind = json.loads((quick / "data" / "vqa_test_blind.json").read_text())
    assert {e["image"] for e in blind} == {"blind.png"}


def test_second_run_skips_every_stage(quick, capsys):
    said = []
    run_demo(quick, profile="quick", threads=1, quiet=True, say=said.append)
    skipped = [s for s in said if "skipped" in s]
    assert len(skipped) == len(json.loads((quick / "results.json").read_text())["stages"]) > 40
    assert not any("redoing" in s for s in said)
    # the command says so on stderr, with the overall bar, and prints the table and the sentences
    assert main(["demo", "--quick", "--threads", "1", "--out", str(quick)]) == 0
    cap = capsys.readouterr()
    assert "[demo] vqa-none: finished before with the same settings, skipped" in cap.err and "demo" in cap.err
    assert "| none | fine-tuned unpruned |" in cap.out and "Smoke run" in cap.out and "report:" in cap.out


def test_moved_demo_directory_keeps_its_stages(quick, tmp_path):
    """The stage keys hash paths inside OUT relative to it: a copied (or moved) demo directory is continued."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(quick, moved)
    said = []
    run_demo(moved, profile="quick", threads=1, quiet=True, say=said.append)
    assert not any("redoing" in s for s in said) and sum("skipped" in s for s in said) > 40


def test_vqa_first_stage_keeps_the_blind_row_blind(quick):
    """With a VQA first stage, the blind row starts from a first stage of its own on the constant image."""
    init = {r: json.loads((quick / f"vqa-{r}" / "train_config.json").read_text())["init"] for r in ("none", "trips", "blind")}
    assert init["none"] == init["trips"] == str(quick / "pretrain")
    assert init["blind"] == str(quick / "pretrain-blind")
    first = json.loads((quick / "pretrain-blind" / "train_config.json").read_text())
    assert first["task"] == "vqa" and first["train"].endswith("vqa_train_blind.json")


def test_learned_methods_train_with_a_teacher(quick):
    """DynamicViT and TiP are stage-2 runs with their own method and the unpruned run as the teacher."""
    for m in ("dynamicvit", "tip"):
        cfg = json.loads((quick / f"vqa-{m}" / "train_config.json").read_text())
        assert cfg["method"]["name"] == m and cfg["task_options"]["teacher"] == str(quick / "vqa-none")
        assert cfg["init"] == str(quick / "pretrain")
    rows = {(r["method"], r["setup"]) for r in json.loads((quick / "results.json").read_text())["rows"]}
    assert ("dynamicvit", "fine-tuned with its losses") in rows and ("tip", "fine-tuned with its losses") in rows


def test_every_stage_has_a_cost_weight(quick):
    from vlprune.demo.pipeline import _Plan

    weights = _Plan(quick, QUICK).weights()
    stages = [t["stage"] for t in json.loads((quick / "results.json").read_text())["stages"]]
    assert sorted(stages) == sorted(weights) and all(w > 0 for w in weights.values())


def test_changed_settings_redo_downstream(tmp_path):
    out = tmp_path / "q"
    small = replace(QUICK, sweep=(0.5, 0.25), vqa=Recipe(steps=2, lr=3e-4, batch_size=8), seeds=(0, 1),
                    tuned=("trips", "evit"), pretrain=Recipe(steps=2, lr=3e-4, batch_size=8, options={"mlm": 0.3}),
                    pretrain_task="pretrain")
    run_demo(out, profile=small, threads=1, quiet=True)
    # the fine-tunes start from the pre-trained checkpoint, whose optimiser state is gone
    assert (out / "pretrain" / "model").is_dir() and not has_checkpoint(out / "pretrain")
    assert json.loads((out / "vqa-trips" / "train_config.json").read_text())["init"] == str(out / "pretrain")
    res = json.loads((out / "results.json").read_text())  # a second seed for the rows in seed_rows
    assert [r["method"] for r in res["seeds"]] == ["none", "blind"] and len(res["seeds"][0]["accuracies"]) == 2
    assert (out / "vqa-blind-s1" / "model").is_dir() and not (out / "vqa-trips-s1").exists()
    assert "## Seeds" in (out / "report.md").read_text() and "Across seeds 0, 1" in res["sentences"][-1]
    said = []
    run_demo(out, profile=replace(small, vqa=Recipe(steps=3, lr=3e-4, batch_size=8)), threads=1, quiet=True,
             say=said.append)
    assert any(s.startswith("data: finished before") for s in said)
    assert any(s.startswith("pretrain: finished before") for s in said)
    assert any(s.startswith("retrieval-none: finished before") for s in said)
    assert any(s.startswith("vqa-none: settings changed") for s in said)
    assert any(s.startswith("eval-vqa-trips-k0.25: settings changed") for s in said)
    assert json.loads((out / "vqa-none" / DONE).read_text())["result"]["steps"] == 3


def test_overwrite_and_foreign_directory(tmp_path, capsys):
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(foreign), "--quiet"]) == 2
    assert "holds no demo run" in capsys.readouterr().err and (foreign / "notes.txt").is_file()
    (foreign / "report.md").write_text("an old demo's report")
    assert main(["demo", "--quick", "--out", str(foreign), "--quiet"]) == 2
    assert "older vlprune demo" in capsys.readouterr().err and (foreign / "report.md").is_file()
    out = tmp_path / "q"
    small = replace(QUICK, sweep=(0.5, 0.25), tuned=())  # no fine-tuning with reduction: overlays at inference
    run_demo(out, profile=small, threads=1, quiet=True)
    assert "evit (applied at inference to the unpruned model)" in (out / "report.md").read_text()
    assert not (out / "vqa-trips").exists()
    said = []
    run_demo(out, profile=small, threads=1, quiet=True, overwrite=True, say=said.append)
    assert said[0].startswith("--overwrite: deleting") and not any("skipped" in s for s in said)


def test_interrupted_training_resumes(tmp_path):
    from vlprune.data.scenes import generate
    from vlprune.demo.steps import train_run
    from vlprune.train import TrainConfig, train

    data = tmp_path / "data"
    generate(data, images=24, seed=0, image_size=32)
    model = tmp_path / "model.json"
    model.write_text(json.dumps(__import__("vlprune").config.to_dict(model_config(QUICK))))
    cfg = TrainConfig(task="vqa", train=str(data / "vqa_train.json"), images=str(data), model=str(model), steps=4,
                      batch_size=4, ckpt_every=1, task_options={"answers": str(data / "answer_list.json")})
    run = tmp_path / "run"
    stop = lambda step, rec: signal.raise_signal(signal.SIGINT) if step == 2 else None  # noqa: E731
    assert train(cfg, run, overwrite=True, callback=stop)["interrupted"]
    assert has_checkpoint(run)
    res = train_run(run, cfg, progress=False)
    assert res["steps"] == 4 and not has_checkpoint(run)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


def test_operating_points():
    cfg = model_config(DEFAULT)
    assert cfg.vision.num_patches == 144
    t = point(DEFAULT, "trips", 0.25, cfg)
    assert t.layers == (2, 3) and t.keep == 0.5
    # ToMe merges as many tokens at each layer as TRIPS removes there: 144 -> 73 -> 38 candidates
    assert point(DEFAULT, "tome", 0.25, cfg).options["r"] == [71, 35]
    assert point(DEFAULT, "elip", 0.25, cfg).keep == (0.35, 0.25)
    assert point(DEFAULT, "elip", 0.9, cfg).keep == (1.0, 0.9)
    assert point(DEFAULT, "lowres", 0.25, cfg).options["image_size"] == 48
    assert point(DEFAULT, "none", 0.5) is None
    with pytest.raises(ValueError, match="no operating points"):
        point(DEFAULT, "tip", 0.5, cfg)
    with pytest.raises(ValueError, match=r"keeps must be in \(0, 1\]"):
        replace(QUICK, sweep=(0.5, 1.5))
    with pytest.raises(ValueError, match="not fine-tuned"):
        replace(QUICK, tuned=("evit",), seed_rows=("none", "trips"))
    with pytest.raises(ValueError, match="unknown method"):
        replace(QUICK, tuned=("tip",))
    with pytest.raises(ValueError, match="main_keep"):
        replace(QUICK, main_keep=0.6)
    with pytest.raises(ValueError, match="unknown demo profile"):
        run_demo("unused", profile="huge")


def test_every_operating_point_fits_its_model(tmp_path):
    for prof in (QUICK, DEFAULT, FULL):
        validate(prof)
    bad = replace(QUICK, schedules={**QUICK.schedules, "trips": {"layers": (2, 9)}})
    with pytest.raises(ValueError, match="trips at keep 0.9 .* does not fit the model"):
        validate(bad)
    with pytest.raises(ValueError, match="does not fit"):  # before anything is written
        run_demo(tmp_path / "d", profile=bad)
    assert not (tmp_path / "d").exists()


def test_demo_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for opt in ("--quick", "--full", "--threads", "--quiet", "--overwrite", "--out"):
        assert opt in text
