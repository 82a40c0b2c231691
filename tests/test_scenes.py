"""The scenes generator: determinism, formats, and answers re-derived from the generator's own metadata."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlprune.cli import main
from vlprune.data import formats
from vlprune.data.scenes import COLOURS, generate

FILES = ["pretrain", "retrieval_train", "retrieval_test", "vqa_train", "vqa_test", "nlvr2_train", "nlvr2_test",
         "ve_train", "ve_test"]


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    generate(out, images=40, seed=7)
    return out


def test_same_seed_same_files_other_seed_differs(scenes, tmp_path):
    generate(tmp_path / "a", images=40, seed=7)
    assert digest(tmp_path / "a") == digest(scenes)
    generate(tmp_path / "b", images=40, seed=8)
    assert digest(tmp_path / "b") != digest(scenes)
    generate(tmp_path / "c", images=20, seed=7, test_fraction=0.5)  # image i depends on (seed, i) only
    assert (tmp_path / "c/images/000003.png").read_bytes() == (scenes / "images/000003.png").read_bytes()


def test_files_load_with_the_format_loaders(scenes):
    kinds = {"pretrain": "pretrain", "retrieval_train": "retrieval_train", "retrieval_test": "retrieval_test",
             "vqa_train": "vqa", "vqa_test": "vqa", "nlvr2_train": "nlvr2", "nlvr2_test": "nlvr2", "ve_train": "ve",
             "ve_test": "ve"}
    for name in FILES:
        entries = formats.load_annotations(scenes / f"{name}.json", kinds[name])
        for e in entries:
            for p in e.get("images", [e.get("image")]):
                assert (scenes / p).is_file()
    answers = formats.load_answer_list(scenes / "answer_list.json")
    vqa = formats.load_vqa(scenes / "vqa_train.json", True) + formats.load_vqa(scenes / "vqa_test.json")
    assert {a for q in vqa for a in q["answer"]} <= set(answers)
    train = {e["image"] for e in formats.load_pretrain(scenes / "pretrain.json")}
    test = {e["image"] for e in formats.load_retrieval(scenes / "retrieval_test.json", "test")}
    assert train and test and not train & test


def _objects(scenes):
    meta = json.loads((scenes / "scenes.json").read_text())
    return {s["image"]: s for s in meta["scenes"]}


def test_masks_match_objects_and_pixels(scenes):
    for img, sc in list(_objects(scenes).items())[:10]:
        labels = np.asarray(Image.open(scenes / sc["mask"]))
        pixels = np.asarray(Image.open(scenes / img)).astype(int)
        assert sorted(set(np.unique(labels)) - {0}) == [o["id"] for o in sc["objects"]]
        for o in sc["objects"]:
            ys, xs = np.nonzero(labels == o["id"])
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == o["bbox"]
            mean = pixels[labels == o["id"]].mean(0)  # the object's pixels have its colour (noise averages out)
            assert np.abs(mean - np.array(COLOURS[o["colour"]])).max() < 25


def answer(q, objs):
    """A naive re-derivation of each VQA answer from the object list."""
    text = q["question"]
    m = re.fullmatch(r"what colour is the (?:(small|large) )?(\w+)\?", text)
    if m:
        (o,) = [o for o in objs if o["shape"] == m[2] and (m[1] is None or o["size"] == m[1])]
        return o["colour"]
    m = re.fullmatch(r"what shape is the (\w+) thing\?", text)
    if m:
        (o,) = [o for o in objs if o["colour"] == m[1]]
        return o["shape"]
    m = re.fullmatch(r"is there an? (\w+) (\w+)\?", text)
    if m:
        return "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    m = re.fullmatch(r"how many (\w+) things are there\?", text)
    if m:
        return str(sum(o["colour"] == m[1] for o in objs))
    m = re.fullmatch(r"how many (\w+)s are there\?", text)
    if m:
        return str(sum(o["shape"] == m[1] for o in objs))
    m = re.fullmatch(r"which is further left, the (\w+) (\w+) or the (\w+) (\w+)\?", text)
    if m:
        (a,) = [o for o in objs if (o["colour"], o["shape"]) == (m[1], m[2])]
        (b,) = [o for o in objs if (o["colour"], o["shape"]) == (m[3], m[4])]
        left = a if a["center"][0] < b["center"][0] else b
        return f"{left['colour']} {left['shape']}"
    raise AssertionError(f"unparsed question {text!r}")


def test_vqa_answers_follow_from_metadata(scenes):
    objs = _objects(scenes)
    vqa = json.loads((scenes / "vqa_train.json").read_text())
    types = set()
    for q in vqa:
        assert answer(q, objs[q["image"]]["objects"]) == q["answer"][0], q
        assert set(q["objects"]) <= {o["id"] for o in objs[q["image"]]["objects"]}
        types.add(q["type"])
    assert types == {"colour", "shape", "exists", "count", "left"}
    yes = sum(q["answer"] == ["yes"] for q in vqa)
    no = sum(q["answer"] == ["no"] for q in vqa)
    assert yes > 0 and no > 0


def test_nlvr2_and_ve_are_balanced(scenes):
    nl = json.loads((scenes / "nlvr2_train.json").read_text())
    assert sum(e["label"] == "True" for e in nl) == sum(e["label"] == "False" for e in nl) > 0
    objs = _objects(scenes)
    for e in nl:  # check the "contains" statements against the metadata
        m = re.fullmatch(r"the (left|right) image contains an? (\w+) (\w+)", e["sentence"])
        if m:
            sc = objs[e["images"][0 if m[1] == "left" else 1]]["objects"]
            truth = any((o["colour"], o["shape"]) == (m[2], m[3]) for o in sc)
            assert ("True" if truth else "False") == e["label"]
    ve = json.loads((scenes / "ve_train.json").read_text())
    labels = [e["label"] for e in ve]
    assert labels.count("entailment") == labels.count("neutral") == labels.count("contradiction") > 0


def test_cli_writes_scenes_and_rejects_bad_args(tmp_path, capsys):
    assert main(["data", "scenes", "--out", str(tmp_path / "s"), "--images", "12", "--seed", "1"]) == 0
    assert (tmp_path / "s" / "vqa_test.json").is_file()
    assert "12 images" in capsys.readouterr().out
    assert main(["data", "scenes", "--out", str(tmp_path / "s"), "--images", "12"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["data", "scenes", "--out", str(tmp_path / "t"), "--images", "1"]) == 2
    assert "images must be" in capsys.readouterr().err


def test_question_types_and_object_scale(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, images=16, seed=3, question_types=("colour", "shape"))
    generate(b, images=16, seed=3, object_scale=1.5)
    vqa = json.loads((a / "vqa_train.json").read_text())
    assert vqa and {q["type"] for q in vqa} == {"colour", "shape"}
    objs = _objects(a)
    for q in vqa:  # still true by construction
        assert answer(q, objs[q["image"]]["objects"]) == q["answer"][0], q
    area = {}
    for root in (a, b):  # larger objects cover more pixels (same seeds, same first object kinds)
        meta = json.loads((root / "scenes.json").read_text())["scenes"]
        area[root] = sum((o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1])
                         for s in meta for o in s["objects"]) / sum(len(s["objects"]) for s in meta)
    assert area[b] > 1.5 * area[a]
    with pytest.raises(ValueError, match="question_types"):
        generate(tmp_path / "c", images=8, question_types=("colour", "size"))
    with pytest.raises(ValueError, match="object_scale"):
        generate(tmp_path / "c", images=8, object_scale=5.0)
