import json

import numpy as np
import pytest

import vlprune
from vlprune.data.images import ImageLoader
from vlprune.data.scenes import generate
from vlprune.data.tokenizer import TextTokenizer
from vlprune.reduce import ReduceConfig
from vlprune.tasks.grounding import alignment, grounding_scores, object_patches


def test_object_patches_and_alignment_by_hand():
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[0:2, 0:3] = 1  # object 1 touches patches (0,0) and (0,1) of a 4x4 grid of 2-px patches
    labels[7, 7] = 2
    target = object_patches(labels, [1], grid=4)
    assert target.sum() == 2 and target[0, 0] and target[0, 1]
    assert object_patches(labels, [1, 2], grid=4).sum() == 3
    kept = np.zeros((4, 4), dtype=bool)
    kept[0, 0] = kept[3, 3] = kept[2, 2] = True
    a = alignment(kept, target)
    assert a["precision"] == pytest.approx(1 / 3) and a["recall"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="does not split"):
        object_patches(labels, [1], grid=3)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    generate(d, images=12, seed=0, image_size=32)
    return d


def test_grounding_on_scenes(scenes):
    cfg = vlprune.load_preset("tiny")
    entries = json.loads((scenes / "vqa_test.json").read_text())
    meta = json.loads((scenes / "scenes.json").read_text())
    masks = {s["image"]: s["mask"] for s in meta["scenes"]}
    tok = TextTokenizer.train([e["question"] for e in entries], vocab_size=cfg.text.vocab_size)
    loader = ImageLoader.for_model(cfg.vision, scenes)
    full = grounding_scores(vlprune.build_model(cfg), entries, masks, scenes, loader, tok)
    assert full["recall"] == 1.0 and 0 < full["precision"] < 1  # nothing pruned: every object patch kept
    model = vlprune.build_model(cfg, method=ReduceConfig("trips", layers=(2,), keep=0.5))
    half = grounding_scores(model, entries, masks, scenes, loader, tok)
    assert half["questions"] == full["questions"] == len([e for e in entries if e.get("objects")])
    assert 0 <= half["recall"] < 1.0
