"""The captioning and grounding commands end to end: ``train caption`` and ``eval caption`` / ``eval grounding`` on
tiny scenes data, ``eval caption --hf`` on a tiny BlipForConditionalGeneration saved locally (nothing downloaded),
and the caption files' errors."""

from __future__ import annotations

import json

import pytest
import torch

import hf_tiny
from vlprune.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "run"
    argv = ["train", "caption", "--model", "tiny", "--steps", "3", "--batch-size", "8", "--scenes-images", "40",
            "--threads", "1", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_train_and_eval_caption_and_grounding(caption_run, capsys, tmp_path):
    data = caption_run / "data"
    for name in ("caption_train.json", "caption_test.json", "caption_test_gt.json", "grounding_test.json"):
        assert (data / name).is_file()
    res = tmp_path / "results.json"
    argv = ["eval", "caption", "--checkpoint", str(caption_run), "--method", "evit", "--layers", "2", "--keep", "0.5",
            "--num-beams", "2", "--references", str(data / "caption_test_gt.json"), "--predictions", str(res),
            "--metric-tokenizer", "python", "--threads", "1", "--quiet", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "evit" and out["image_tokens"] == 10.0 and {"CIDEr", "Bleu_4", "ROUGE_L"} <= set(out)
    written = json.loads(res.read_text())
    test = json.loads((data / "caption_test.json").read_text())
    assert [r["image_id"] for r in written] == [e["image_id"] for e in test]
    # a text-guided method needs --guide prompt
    assert main(argv[:5] + ["trips", "--layers", "2", "--keep", "0.5", "--quiet"]) == 2
    assert "text-guided" in capsys.readouterr().err
    argv = ["eval", "grounding", "--checkpoint", str(caption_run), "--method", "trips", "--layers", "2", "--keep", "0.5",
            "--threads", "1", "--quiet", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= out["accuracy"] <= 100 and 0 < out["random_accuracy"] < 100 and out["image_tokens"] < 17
    png = tmp_path / "heat.png"
    argv = ["visualize", "--checkpoint", str(caption_run), "--image", str(data / "images" / "000000.png"), "--text",
            "the red circle", "--heat", "itm", "--method", "evit", "--layers", "2", "--keep", "0.5", "--out", str(png)]
    assert main(argv) == 0 and png.stat().st_size > 1000
    assert "grounding heat, 10 image tokens" in capsys.readouterr().out


def test_caption_reference_file_of_another_split_and_empty_captions(caption_run, capsys, tmp_path):
    data = caption_run / "data"
    other = tmp_path / "gt.json"
    other.write_text(json.dumps({"images": [{"id": 99999}], "annotations": [{"image_id": 99999, "caption": "x", "id": 0}]}))
    argv = ["eval", "caption", "--checkpoint", str(caption_run), "--references", str(other), "--threads", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "gt.json: no reference caption for" in err and "another split" in err
    bad = tmp_path / "test.json"
    entries = json.loads((data / "caption_test.json").read_text())
    entries[1]["caption"] = []
    bad.write_text(json.dumps(entries))
    assert main(["eval", "caption", "--checkpoint", str(caption_run), "--test", str(bad), "--images", str(data),
                 "--quiet"]) == 2
    assert "test.json: entry 1 field 'caption' must be a non-empty list" in capsys.readouterr().err


def test_eval_caption_hf_blip_with_pruning(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    d = hf_tiny.save_with_processor(hf_tiny.blip("BlipForConditionalGeneration"), tmp_path / "m")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"COCO_val_{i:06d}.png")
        entries.append({"image": f"COCO_val_{i:06d}.png", "caption": ["a red cube", "two blue cubes"]})
    test = tmp_path / "test.json"
    test.write_text(json.dumps(entries))
    rows = {}
    for method in (["--method", "none"], ["--method", "tome", "--layers", "2", "--option", "r=4"],
                   ["--method", "evit", "--layers", "2", "--keep", "0.5"], ["--method", "random", "--layers", "2", "--keep", "0.5"],
                   ["--method", "dynamicvit", "--layers", "2", "--keep", "0.5"]):  # every method patch offers on BLIP's captioner
        argv = ["eval", "caption", "--hf", str(d), "--test", str(test), "--num-beams", "2", "--max-length", "8",
                "--min-length", "2", "--prompt", "a ", "--metric-tokenizer", "python", "--quiet", "--json", *method]
        assert main(argv) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        rows[out["method"]] = out
        assert out["examples"] == 3 and out["seconds_per_image"] > 0 and "CIDEr" in out
    assert rows["none"]["image_tokens"] == 17
    assert rows["tome"]["image_tokens"] == 13 and rows["evit"]["image_tokens"] < 17
    assert rows["random"]["image_tokens"] == 9 and rows["dynamicvit"]["image_tokens"] == 9
    from vlprune.patch.blip import CLASSES
    assert set(rows) == set(CLASSES["BlipForConditionalGeneration"].methods())


def test_demo_rows_with_intervals_and_baselines(caption_run):
    from vlprune.tasks.caption_rows import caption_rows, grounding_rows

    rows = caption_rows(caption_run, [None, "random"], n_boot=200, tokenizer="python", num_beams=1)
    assert [r["method"] for r in rows] == ["none", "random", "blind (grey image)"]
    for r in rows:
        assert r["CIDEr_low"] <= r["CIDEr"] <= r["CIDEr_high"] and r["metric_tokenizer"] == "python"
    assert rows[1]["image_tokens"] < rows[0]["image_tokens"]
    rows = grounding_rows(caption_run, [None], n_boot=200)
    assert [r["method"] for r in rows] == ["none", "random box"]
    assert all(r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] for r in rows)


def test_eval_grounding_with_the_captioner(caption_run, capsys):
    argv = ["eval", "grounding", "--checkpoint", str(caption_run), "--grounding-mode", "caption", "--method", "evit",
            "--layers", "2", "--keep", "0.5", "--threads", "1", "--quiet", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode"] == "caption" and 0 <= out["accuracy"] <= 100 and out["image_tokens"] == 10.0


@pytest.mark.parametrize("layer", [0, 99])
def test_eval_grounding_layer_out_of_range_is_named_in_1_based_terms(caption_run, capsys, layer):
    argv = ["eval", "grounding", "--checkpoint", str(caption_run), "--grounding-layer", str(layer), "--threads", "1",
            "--quiet"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "--grounding-layer" in err and f"got {layer}" in err and "[1, " in err
