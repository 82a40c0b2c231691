"""Official checkpoints run as their authors ran them (issue 26): a fine-tuned ELIP checkpoint is unpruned unless
asked, `train --init-official` fine-tunes at the task's official image size (or --image-size), and captions are
cleaned as ALBEF cleans them. Tiny fakes with the official names (tests/reference/official_fakes.py)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import vlprune
from vlprune.cli import main
from vlprune.commands.official import convert
from vlprune.data.tokenizer import TextTokenizer, clean_albef
from vlprune.models.official import load_official

from reference.official_fakes import FakeALBEF
from test_cli_official import _setup


def _ckpt(tmp_path, variant, **extra):
    torch.manual_seed(1)
    path = tmp_path / f"{variant}.pth"
    torch.save({"model": FakeALBEF(variant).state_dict(), **extra}, path)
    return path


def test_a_finetuned_elip_checkpoint_is_unpruned_unless_asked(tmp_path):
    ft = _ckpt(tmp_path, "retrieval")
    model, rep = load_official(ft, "elip", heads=4)
    assert rep.method is None and model.method_config is None
    assert any("loaded unpruned" in n for n in rep.notes)
    asked, rep2 = load_official(ft, "elip", heads=4, method=vlprune.ReduceConfig("elip", layers=(1, 2), keep=(0.9, 0.5)))
    assert rep2.method["name"] == "elip"
    prune = {"begin_layer": [0], "num_act_layers": [1], "keep_ratio": [0.5]}  # the checkpoint's config asks
    _, rep3 = load_official(_ckpt(tmp_path, "retrieval", config={"img_prune": prune}), "elip", heads=4)
    assert rep3.method["name"] == "elip" and rep3.method["keep"] == [0.5]


def _args(tmp_path, tok, command, task, **kw):
    base = dict(command=command, task=task, init_official=str(_ckpt(tmp_path, "pretrain")), format="albef",
                official_heads=4, official_strict="yes", tokenizer=str(tok), image_size=None, text_cleaning=None,
                official_report=None)
    if command == "train":
        base["official_dir"] = None
    return argparse.Namespace(**{**base, **kw})


def test_init_official_image_size_defaults_to_the_official_finetuning_size(tmp_path, capsys):
    _, tok, data = _setup(tmp_path)
    sizes = {}
    for name, kw in {"train-retrieval": dict(command="train", task="retrieval"),
                     "train-pretrain": dict(command="train", task="pretrain"),
                     "eval": dict(command="eval", task="retrieval"),
                     "typed": dict(command="train", task="retrieval", image_size=48)}.items():
        dest = tmp_path / name
        convert(_args(tmp_path, tok, **kw), dest)
        sizes[name] = json.loads((dest / "config.json").read_text())["model"]["vision"]["image_size"]
    assert sizes == {"train-retrieval": 384, "train-pretrain": 32, "eval": 32, "typed": 48}
    run = tmp_path / "run"
    assert main(["train", "ve", "--train", str(data / "ve_train.json"), "--steps", "1", "--batch-size", "2",
                 "--init-official", str(_ckpt(tmp_path, "ve")), "--format", "albef", "--official-heads", "4",
                 "--tokenizer", str(tok), "--image-size", "40", "--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "model" / "config.json").read_text())["model"]["vision"]["image_size"] == 40
    assert main(["train", "ve", "--image-size", "40", "--out", str(tmp_path / "x")]) == 2
    assert "--image-size is for --init-official" in capsys.readouterr().err


def test_captions_are_cleaned_as_albef_cleans_them(tmp_path):
    assert clean_albef("A Man's DOG, running-fast/jumping  <person>!") == "a mans dog running fast jumping person"
    assert clean_albef(" ".join(f"w{i}" for i in range(40))) == " ".join(f"w{i}" for i in range(30))
    _, tok_dir, _ = _setup(tmp_path)
    dest = tmp_path / "conv"
    convert(_args(tmp_path, tok_dir, "eval", "retrieval"), dest)
    tok = TextTokenizer.from_dir(dest / "tokenizer")
    plain = TextTokenizer.from_dir(tok_dir)
    assert tok.cleaning == "albef" and plain.cleaning == "none"
    text = "A,b. C!d (e) f-g/h"
    ids, _ = tok.encode([text], 40)
    assert torch.equal(ids, plain.encode(["ab cd e f g h"], 40)[0])
    long = " ".join("abcdefghijklmnopqrstuvwxyz") * 2  # 52 one-letter words: 30 words, then 30 tokens
    assert tok.encode([long], 40)[0].shape[1] == 30 and plain.encode([long], 40)[0].shape[1] == 40
    convert(_args(tmp_path, tok_dir, "eval", "retrieval", text_cleaning="none"), tmp_path / "raw")
    assert TextTokenizer.from_dir(tmp_path / "raw" / "tokenizer").cleaning == "none"


@pytest.mark.parametrize("bad", ["--text-cleaning", "--format"])
def test_official_only_flags_need_init_official(tmp_path, capsys, bad):
    value = {"--text-cleaning": "albef", "--format": "albef"}[bad]
    assert main(["eval", "ve", "--checkpoint", str(tmp_path), bad, value]) == 2
    assert f"{bad} is for --init-official" in capsys.readouterr().err
