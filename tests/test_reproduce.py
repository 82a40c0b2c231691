"""``vlprune reproduce``: every paper recipe validates, plans (dry run) and runs for 2 steps per stage on the
tiny fake releases with the tiny model; the cost estimate's token counts equal a full-width model's; bad input
fails before any stage starts."""

from __future__ import annotations

import json

import pytest
import torch

import prepare_fakes as fakes
import vlprune
from vlprune.bench.flops import analytic_flops, layer_tokens
from vlprune.cli import main
from vlprune.paper_recipes import list_recipes, load_recipe, validate_recipe
from vlprune.paper_recipes.cost import forward_flops, narrow_config, steps_for
from vlprune.paper_recipes.plan import split_count
from vlprune.prepare import prepare
from vlprune.reduce.registry import ReduceConfig

RECIPES = list_recipes()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("releases")
    for name in fakes.BUILDERS:
        fakes.build(name, base / "src" / name)
        prepare(name, base / "src" / name, base / "data")
    prepare("pretrain-4m", base / "data", base / "data")
    return base / "data"


def test_recipes_cover_the_seed_papers():
    assert {"trips-albef-4m", "elip-albef-4m", "tip-vilt", "laps-vit224"} <= set(RECIPES)
    for name in RECIPES:
        r = load_recipe(name)
        assert r["reported"] and r["settings_source"]


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_plan(name, data, capsys):
    assert main(["--threads", "1", "reproduce", name, "--dry-run", "--data", str(data), "--out", "O"]) == 0
    text = capsys.readouterr().out
    recipe = load_recipe(name)
    for s in recipe["stages"]:
        assert f" {s['name']} ({s['task']})" in text
        if s.get("runnable", True) is False:
            assert f"not runnable here: {s['why']}" in text
            continue
        n = sum(split_count(data, ref)[0] for ref in s["train"])
        assert f"{steps_for(n, s['epochs'], s['batch']):,} steps" in text
        assert f"writes O/{s['name']}/" in text
    assert text.count("A100-hours at MFU 0.35") == sum(s.get("runnable", True) for s in recipe["stages"]) + 1


def test_dry_run_without_data_counts_the_full_release(capsys):
    assert main(["--threads", "1", "reproduce", "trips-albef-4m", "--dry-run", "--stage", "x"]) == 0
    text = capsys.readouterr().out
    assert "train coco/train: 566,747 samples (full release" in text
    assert f"{steps_for(566_747, 5, 256):,} steps" in text


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_two_steps_per_stage(name, data, tmp_path, capsys):
    args = ["--threads", "1", "--quiet", "reproduce", name, "--data", str(data), "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--model", "tiny", "--ckpt-every", "2"]
    assert main(args) == 0
    runnable = [s["name"] for s in load_recipe(name)["stages"] if s.get("runnable", True)]
    for stage in runnable:
        meta = json.loads((tmp_path / "run" / stage / "model" / "config.json").read_text())
        assert meta["step"] == meta["total_steps"] == 2 and not meta["interrupted"]
    capsys.readouterr()
    assert main(args) == 0  # a second run finds every stage done
    assert capsys.readouterr().out.count("done already") == len(runnable)


def test_checkpoint_of_another_model_and_missing_data_fail_before_any_stage(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--threads", "1", "--quiet", "reproduce", "laps-vit224", "--data", str(data), "--out", str(run),
                 "--max-steps", "1", "--model", "tiny", "--stage", "retrieval-flickr"]) == 0
    tiny_ckpt = run / "retrieval-flickr"
    assert main(["reproduce", "trips-albef-4m", "--data", str(data), "--out", str(tmp_path / "b"),
                 "--init", str(tiny_ckpt), "--stage", "vqa"]) == 2
    err = capsys.readouterr().err
    assert "does not match the model of recipe trips-albef-4m" in err
    assert "vision.width: checkpoint 32, recipe 768" in err
    assert not (tmp_path / "b" / "vqa").exists()
    assert main(["reproduce", "laps-vit224", "--data", str(data), "--out", str(tmp_path / "c")]) == 2
    assert "give --init" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["reproduce", "trips-albef-4m", "--data", str(empty), "--out", str(tmp_path / "d"), "--max-steps", "1",
                 "--model", "tiny"]) == 2
    assert "holds no prepared data" in capsys.readouterr().err and not (tmp_path / "d" / "pretrain").exists()
    assert main(["reproduce", "tip-vilt", "--dry-run", "--model", "tiny"]) == 2
    assert "--model is for miniature runs" in capsys.readouterr().err
    assert main(["reproduce", "tip-vilt", "--data", str(data), "--max-steps", "1", "--model", "tiny",
                 "--stage", "nope", "--out", str(tmp_path / "e")]) == 2
    assert "has no stage 'nope'" in capsys.readouterr().err


def test_recipe_validation_names_the_problem():
    good = load_recipe("tip-vilt")
    bad = json.loads(json.dumps(good))
    bad["stages"][1]["init"] = "stage:later"
    with pytest.raises(ValueError, match="init 'stage:later' must be 'checkpoint' or 'stage:NAME'"):
        validate_recipe(bad, "r.json")
    bad = json.loads(json.dumps(good))
    bad["stages"][0]["epochs"] = 0
    with pytest.raises(ValueError, match="field 'epochs' must be an integer >= 1, got 0"):
        validate_recipe(bad, "r.json")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")


@pytest.mark.parametrize("method", [None, ReduceConfig("trips", layers=(2, 3), keep=0.6),
                                    ReduceConfig("elip")])
def test_cost_token_counts_equal_the_full_width_model(method):
    cfg = vlprune.config.override(vlprune.load_preset("tiny"), **{"vision.image_size": 48})
    model = vlprune.build_model(cfg, method).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (1, 30), generator=g)
    ids[:, 0] = 1
    full = analytic_flops(cfg, 30, layer_tokens(model, torch.randn(1, 3, 48, 48, generator=g), ids,
                                                torch.ones(1, 30, dtype=torch.long)))
    est = forward_flops(cfg, method)
    assert {k: est[k] for k in full} == full
    assert narrow_config(cfg).vision.width == 16  # 4 per head: the trace is cheap at any image size


def test_resized_init_interpolates_position_embeddings(tmp_path):
    from vlprune.models.build import load_pretrained, save_pretrained
    from vlprune.paper_recipes.run import resized_init

    save_pretrained(vlprune.build_model("tiny"), tmp_path / "ckpt")
    assert resized_init(str(tmp_path / "ckpt"), 32, tmp_path / "same") == str(tmp_path / "ckpt")
    out = resized_init(str(tmp_path / "ckpt"), 64, tmp_path / "big")
    model = load_pretrained(f"{out}/model")
    assert model.cfg.vision.image_size == 64 and model.state_dict()["vision.embeddings.pos_embed"].shape[1] == 1 + 64


def test_stage_grad_checkpointing_reaches_the_run(data, tmp_path):
    recipe = load_recipe("laps-vit224")
    recipe["stages"] = [s for s in recipe["stages"] if s["name"] == "retrieval-flickr"]
    recipe["stages"][0]["grad_checkpointing"] = True
    path = tmp_path / "ck.json"
    path.write_text(json.dumps(recipe))
    run = tmp_path / "run"
    assert main(["--threads", "1", "--quiet", "reproduce", str(path), "--data", str(data), "--out", str(run),
                 "--max-steps", "1", "--model", "tiny"]) == 0
    saved = json.loads((run / "retrieval-flickr" / "train_config.json").read_text())
    assert saved["grad_checkpointing"] is True
    recipe["stages"][0]["grad_checkpointing"] = "yes"
    with pytest.raises(ValueError, match="field 'grad_checkpointing' must be true or false, got 'yes'"):
        validate_recipe(recipe, "r.json")


def test_reported_numbers_are_verified_or_null():
    verified = {name: [e for e in load_recipe(name)["reported"] if e["verified"]] for name in RECIPES}
    assert [e["values"]["flickr T2I R@1"] for e in verified["laps-vit224"]] == [62.5]
    assert "CrossmodalGroup/LAPS" in verified["laps-vit224"][0]["source"]
    good = load_recipe("tip-vilt")
    bad = json.loads(json.dumps(good))
    bad["reported"][0]["values"]["vqa test-dev"] = 71.3  # a number nobody checked
    with pytest.raises(ValueError, match="is not verified: its values must be null"):
        validate_recipe(bad, "r.json")
    bad = json.loads(json.dumps(good))
    bad["reported"][0]["verified"] = True
    with pytest.raises(ValueError, match="is verified, so every value must be a number"):
        validate_recipe(bad, "r.json")
    bad["reported"][0]["values"] = {"vqa test-dev": 71.3}
    with pytest.raises(ValueError, match="names no 'source'"):
        validate_recipe(bad, "r.json")


def test_stage_stopped_before_its_first_checkpoint_starts_again(data, tmp_path):
    """What a restarted process (torchrun --max-restarts) meets: the stage directory of a run killed before its
    first checkpoint. The same command starts that stage again instead of refusing the directory."""
    import shutil

    args = ["--threads", "1", "--quiet", "reproduce", "laps-vit224", "--data", str(data), "--out",
            str(tmp_path / "run"), "--max-steps", "1", "--model", "tiny", "--stage", "retrieval-flickr"]
    assert main(args) == 0
    stage = tmp_path / "run" / "retrieval-flickr"
    for p in [stage / "model", stage / "latest", *stage.glob("checkpoint-*")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert (stage / "train_config.json").is_file()
    assert main(args) == 0
    assert json.loads((stage / "model" / "config.json").read_text())["step"] == 1
