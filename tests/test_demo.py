"""The demo: the quick profile end to end, its cache (skip / redo / resume), --overwrite, the operating points."""

import json
import shutil
import signal
from pathlib import Path
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
    for section in ("## What the numbers say", "## Setup", "## Targets", "## Main table", "## Accuracy against cost",
                    "## Paired tests", "## Accuracy per question type", "## Text relevance", "## Matched cost",
                    "## Which patches are kept", "## Training runs", "## Wall time per stage"):
        assert section in report
    assert "Smoke run (quick profile)" in report and "(smoke run)" in report
    assert "| blind | image replaced by grey |" in report and "| chance | uniform over" in report
    assert "| majority | always" in report and "| trips | evit | at inference | 0.25 |" in report
    html = (quick / "report.html").read_text()
    assert "<h2>Paired tests</h2>" in html and "curve_gflops.png" in html
    for f in ("report/curve_gflops.png", "report/curve_throughput.png", "overlays/overlay_trips.png",
              "overlays/overlay_evit.png", "report/curve_lift.png", "report/curve_sensitivity.png",
              "overlays/overlay_questions.png"):
        assert (quick / f).stat().st_size > 1000
    res = json.loads((quick / "results.json").read_text())
    assert res["environment"]["torch_threads"] == 1 and "OMP_NUM_THREADS" in res["environment"]["env"]
    rows = {(r["method"], r["setup"]): r for r in res["rows"]}
    none, trips = rows[("none", "fine-tuned unpruned")], rows[("trips", "at inference")]
    assert trips["image_tokens"] < none["image_tokens"] and trips["gflops_image"] < none["gflops_image"]
    assert none["survival"] == 1.0 and trips["survival"] == res["vqa"]["trips-k0.5"]["grounding"]["survival"]
    assert none["vqa_low"] <= none["vqa_acc"] <= none["vqa_high"]
    assert 0 < rows[("chance", f"uniform over {res['baselines']['answers']} answers")]["r_mean"] < 100
    assert {r["method"] for r in res["sweep"]} == set(METHODS) | {"lowres"}
    # the sweep, plus lowres at the one image size (28 px) matching TRIPS's GFLOPs at 0.35 and 0.25
    assert len(res["sweep"]) == len(QUICK.sweep) * (len(METHODS) + 1) + 1
    assert all(len(v["scores"]) == v["examples"] for v in res["vqa"].values())
    assert res["informative"] is False  # the smoke run's unpruned model is not above blind
    # the generated sentences: the old ones, whether the text's guidance helped (lift, sensitivity, matched cost,
    # split), the targets, the findings
    said = res["sentences"]
    assert sum(s.startswith("Text relevance at keep 0.25: ") for s in said) == 2  # TRIPS and ELIP
    assert sum(s.startswith("At the GFLOPs of TRIPS at keep ") for s in said) == 2
    assert any(" targets of the benchmark are not met" in s for s in said)
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
    assert init["none"] == init["trips"] == str(quick / "pretrain-mix")  # the last of QUICK's first_parts
    assert init["blind"] == str(quick / "pretrain-mix-blind")
    first = json.loads((quick / "pretrain-blind" / "train_config.json").read_text())
    assert first["task"] == "vqa" and first["train"].endswith("vqa_train_blind.json")


def test_first_parts_chain_with_their_types_and_repeats(quick):
    """QUICK's further parts: side questions alone from the first stage, then every question with the side ones 3
    times, from the side part; the blind chain gets the same parts on its own (constant-image) questions."""
    for tail, src in (("", "vqa_train.json"), ("-blind", "vqa_train_blind.json")):
        everything = json.loads((quick / "data" / src).read_text())
        side = json.loads((quick / f"pretrain-side{tail}" / "train_config.json").read_text())
        mix = json.loads((quick / f"pretrain-mix{tail}" / "train_config.json").read_text())
        assert side["init"] == str(quick / f"pretrain{tail}") and mix["init"] == str(quick / f"pretrain-side{tail}")
        assert side["steps"] == QUICK.first_parts[0].recipe.steps and mix["lr"] == QUICK.first_parts[1].recipe.lr
        side_rows = json.loads(Path(side["train"]).read_text())
        assert side_rows == [e for e in everything if e["type"] == "side"] != []
        mix_rows = json.loads(Path(mix["train"]).read_text())
        assert len(mix_rows) == len(everything) + 2 * len(side_rows)
        assert sorted(json.dumps(e) for e in mix_rows) == sorted(json.dumps(e) for e in everything + side_rows * 2)


def test_first_parts_are_checked():
    from vlprune.demo.profiles import Part

    with pytest.raises(ValueError, match=r"part mix names question types \['sides'\]"):
        replace(QUICK, first_parts=(Part("mix", Recipe(steps=1, lr=1e-3, batch_size=8), repeat={"sides": 3}),))
    with pytest.raises(ValueError, match="repeat counts must be integers >= 1"):
        Part("mix", Recipe(steps=1, lr=1e-3, batch_size=8), repeat={"side": 0})
    with pytest.raises(ValueError, match="first_parts names must differ"):
        p = Part("a", Recipe(steps=1, lr=1e-3, batch_size=8))
        replace(QUICK, first_parts=(p, p))


def test_warmup_trains_the_warmup_types_first_then_every_type(quick):
    """The curriculum: warm-up (from scratch, warm-up types only, the whole answer list), then the first stage from
    it on every question; the blind row gets both parts on the constant image."""
    for tail, blind in (("", False), ("-blind", True)):
        warm = json.loads((quick / f"warmup{tail}" / "train_config.json").read_text())
        first = json.loads((quick / f"pretrain{tail}" / "train_config.json").read_text())
        assert warm["init"] is None and warm["steps"] == QUICK.warmup.steps
        assert first["init"] == str(quick / f"warmup{tail}")
        rows = json.loads(Path(warm["train"]).read_text())
        everything = json.loads(Path(first["train"]).read_text())
        assert rows and {e["type"] for e in rows} == set(QUICK.warmup_types)
        assert rows == [e for e in everything if e["type"] in QUICK.warmup_types]
        assert all((e["image"] == "blind.png") == blind for e in rows)
        assert warm["task_options"]["answers"] == first["task_options"]["answers"]
        assert warm["lr_mult"] == dict(QUICK.warmup.lr_mult) and first["lr_mult"] == dict(QUICK.pretrain.lr_mult) != {}


def test_warmup_settings_are_checked():
    with pytest.raises(ValueError, match=r"warmup_types must be a non-empty subset of .*\['colour', 'exists', 'count', 'side'\]"):
        replace(QUICK, warmup_types=("pattern",))
    with pytest.raises(ValueError, match="a warm-up stage needs a VQA first stage"):
        replace(QUICK, pretrain_task="pretrain")
    with pytest.raises(ValueError, match=r"unknown module group\(s\) \['head'\]; valid groups: \['vision'"):
        Recipe(steps=1, lr=1e-3, batch_size=8, lr_mult={"head": 10})
    with pytest.raises(ValueError, match="recipe lr_mult heads"):
        Recipe(steps=1, lr=1e-3, batch_size=8, lr_mult={"heads": -1})


def test_learned_methods_train_with_a_teacher(quick):
    """DynamicViT and TiP are stage-2 runs with their own method and the unpruned run as the teacher."""
    for m in ("dynamicvit", "tip"):
        cfg = json.loads((quick / f"vqa-{m}" / "train_config.json").read_text())
        assert cfg["method"]["name"] == m and cfg["task_options"]["teacher"] == str(quick / "vqa-none")
        assert cfg["init"] == str(quick / "pretrain-mix")
    rows = {(r["method"], r["setup"]) for r in json.loads((quick / "results.json").read_text())["rows"]}
    assert ("dynamicvit", "fine-tuned with its losses") in rows and ("tip", "fine-tuned with its losses") in rows


def test_every_stage_has_a_cost_weight(quick):
    from vlprune.demo.pipeline import DemoLayout

    weights = DemoLayout(quick, QUICK).weights()
    stages = [t["stage"] for t in json.loads((quick / "results.json").read_text())["stages"]]
    assert sorted(stages) == sorted(weights) and all(w > 0 for w in weights.values())


def test_changed_settings_redo_downstream(tmp_path):
    out = tmp_path / "q"
    small = replace(QUICK, sweep=(0.5, 0.25), vqa=Recipe(steps=2, lr=3e-4, batch_size=8), seeds=(0, 1),
                    tuned=("trips", "evit"), pretrain=Recipe(steps=2, lr=3e-4, batch_size=8, options={"mlm": 0.3}),
                    pretrain_task="pretrain", warmup=Recipe(steps=0, lr=1e-3, batch_size=8), first_parts=())
    run_demo(out, profile=small, threads=1, quiet=True)
    # the fine-tunes start from the pre-trained checkpoint, whose optimiser state is gone
    assert (out / "pretrain" / "model").is_dir() and not has_checkpoint(out / "pretrain")
    assert json.loads((out / "vqa-trips" / "train_config.json").read_text())["init"] == str(out / "pretrain")
    res = json.loads((out / "results.json").read_text())  # a second seed for the rows in seed_rows
    assert [r["method"] for r in res["seeds"]] == ["none", "blind"] and len(res["seeds"][0]["accuracies"]) == 2
    assert (out / "vqa-blind-s1" / "model").is_dir() and not (out / "vqa-trips-s1").exists()
    report = (out / "report.md").read_text()
    assert "## Seeds" in report and any("Across seeds 0, 1" in x for x in res["sentences"])
    assert "| 0 / 1 |" in report  # the seeds of a row, not a ">" chain
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


def test_quick_demo_relevance_in_results(quick):
    """What the issue's "Done when" asks the report to show is in results.json too."""
    res = json.loads((quick / "results.json").read_text())
    types = {e["type"] for e in json.loads((quick / "data" / "vqa_test.json").read_text())}
    per_type = {r["key"]: r for r in res["per_type"]}
    assert set(per_type["none"]["types"]) == types and per_type["vqa-blind"]["method"] == "blind"
    for t in types:
        assert per_type["none"]["over_blind"][t] == pytest.approx(per_type["none"]["types"][t] - per_type["vqa-blind"]["types"][t])
    # relevance lift and question sensitivity for every method at every keep, with intervals
    rel = {(r["method"], r["keep"]): r for r in res["relevance"] if r["setup"] == "at inference"}
    for m in METHODS:
        for k in QUICK.sweep:
            r = rel[(m, k)]
            assert r["lift"]["low"] <= r["lift"]["mean"] <= r["lift"]["high"]
            assert r["sensitivity"]["low"] <= r["sensitivity"]["mean"] <= r["sensitivity"]["high"]
    for m in ("evit", "tome"):  # image-only selections: the same patches whatever the question
        assert all(rel[(m, k)]["sensitivity"]["mean"] == 1.0 for k in QUICK.sweep)
    assert rel[("random", 0.25)]["sensitivity"]["mean"] < 1.0  # other random patches per question
    # matched GFLOPs: every method at TRIPS's GFLOPs at 0.35 and 0.25, TRIPS tested against its rivals there
    m = {(r["keep"], r["method"]): r for r in res["matched"]}
    assert {k for k, _ in m} == {0.35, 0.25} and {x for _, x in m} == set(METHODS) | {"lowres"}
    for k in (0.35, 0.25):
        g = res["vqa"][f"trips-k{k:g}"]["gflops"]
        # EViT's token counts are TRIPS's (its GFLOPs lack only TRIPS's text-attention scores)
        assert m[(k, "evit")]["near_key"] == f"evit-k{k:g}" and m[(k, "evit")]["near_gflops"] == pytest.approx(g, rel=0.02)
        for rival in ("evit", "tome", "random", "lowres"):
            t = m[(k, rival)]["test"]
            assert 0 < t["p_bootstrap"] <= 1 and 0 < t["p_mcnemar"] <= 1
    # lowres evaluated at the image size whose GFLOPs are nearest TRIPS's at 0.35 (besides the sweep's sizes)
    lo = res["vqa"][m[(0.35, "lowres")]["near_key"]]
    assert lo["method"] == "lowres" and abs(lo["gflops"] / m[(0.35, "lowres")]["gflops"] - 1) < 0.2
    assert any(r["method"] == "lowres" and r.get("image_size") for r in res["sweep"])
    checks = {c["check"]: c for c in res["checks"]}
    assert checks["unpruned above blind, overall (points)"]["value"] == pytest.approx(res["paired"][0]["diff"])
    assert len(checks) == 3 + len(types) and all(c["met"] == (c["value"] >= c["target"]) for c in res["checks"])
    ratio = res["objects_to_budget"]
    assert ratio["source"] == "scenes.json and masks" and ratio["budget"] == 16  # ceil(0.25 * 8 * 8)


def test_demo_grounding_equals_the_grounding_function(quick):
    """The demo's survival / lift / sensitivity for one sweep point are those of tasks.grounding on that model."""
    from vlprune.data.images import ImageLoader
    from vlprune.demo.steps import load_run
    from vlprune.tasks.grounding import grounding_scores

    res = json.loads((quick / "results.json").read_text())
    data = quick / "data"
    model, tok, _ = load_run(quick / "vqa-none", point(QUICK, "trips", 0.25))
    masks = {s["image"]: s["mask"] for s in json.loads((data / "scenes.json").read_text())["scenes"]}
    entries = [e for e in json.loads((data / "vqa_test.json").read_text()) if e.get("objects")][:QUICK.grounding_questions]
    want = grounding_scores(model, entries, masks, data, ImageLoader.for_model(model.cfg.vision, data), tok)
    got = res["vqa"]["trips-k0.25"]["grounding"]
    assert got["records"] == want["records"] and got["pairs_iou"] == pytest.approx(want["pairs_iou"])
    for k in ("survival", "precision", "recall", "lift", "sensitivity", "questions"):
        assert got[k] == pytest.approx(want[k])
    row = next(r for r in res["relevance"] if r["key"] == "trips-k0.25")
    assert row["lift"]["mean"] == pytest.approx(want["lift"]) and row["sensitivity"]["mean"] == pytest.approx(want["sensitivity"])
    assert row["acc_survived"]["n"] + row["acc_lost"]["n"] == want["questions"]


def test_quick_demo_caption_and_grounding_rows(quick):
    """Captioning (its own stage, from retrieval-none) and referring-expression grounding: the unpruned row, every
    method at each task keep, then the blind / random-box baseline, each with its interval."""
    from vlprune.tasks.refgrounding import random_box_accuracy

    res = json.loads((quick / "results.json").read_text())
    methods = [m for m in METHODS for _ in QUICK.task_keeps]
    cap, ground = res["caption"], res["grounding_refs"]
    assert [r["method"] for r in cap] == ["none"] + methods + ["blind (grey image)"]
    assert [r["method"] for r in ground] == ["none"] + methods + ["random box"]
    assert [r["keep"] for r in cap[1:-1]] == [r["keep"] for r in ground[1:-1]] == list(QUICK.task_keeps) * len(METHODS)
    for r in cap:
        assert r["CIDEr_low"] <= r["CIDEr"] <= r["CIDEr_high"] and r["examples"] == QUICK.caption_images
    for r in ground:
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] and r["examples"] == QUICK.grounding_expressions
    assert all(r["image_tokens"] < cap[0]["image_tokens"] for r in cap[1:-1])
    assert all(r["image_tokens"] < ground[0]["image_tokens"] for r in ground[1:-1])
    entries = json.loads((quick / "data" / "grounding_test.json").read_text())[:QUICK.grounding_expressions]
    assert ground[-1]["accuracy"] == pytest.approx(100 * sum(random_box_accuracy(entries)) / len(entries))
    cfg = json.loads((quick / "caption" / "train_config.json").read_text())
    assert cfg["task"] == "caption" and cfg["init"] == str(quick / "retrieval-none")
    report = (quick / "report.md").read_text()
    assert "## Captioning and grounding" in report and "| blind (grey image) |" in report and "| random box |" in report
    assert any(s.startswith("Captioning (unpruned): CIDEr ") for s in res["sentences"])
    assert any(s.startswith("Grounding of referring expressions (unpruned): accuracy ") for s in res["sentences"])


def test_same_run_ignores_the_recorded_thread_count():
    """A demo stage interrupted mid-training resumes: the saved config records the resolved thread count (1) while
    the demo's own config leaves it unset, and that difference alone must not restart the stage from step 0."""
    from vlprune.demo.steps import _same_run

    saved = {"steps": 10, "lr": 1e-3, "threads": 1, "progress": False}
    assert _same_run(saved, {**saved, "threads": None, "progress": True})
    assert not _same_run(saved, {**saved, "lr": 2e-3})
