import json
import math

import numpy as np
import pytest
import torch

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


def _scene():
    """An 8x8 label map on a 4x4 grid of 2-px patches: object 1 in the top-left patch, 2 in the top-right one,
    3 in the bottom-left one (each inside one patch)."""
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[0:2, 0:2] = 1
    labels[0:2, 6:8] = 2
    labels[6:8, 0:2] = 3
    return labels


def _grid(*cells):
    g = np.zeros((4, 4), dtype=bool)
    for i, j in cells:
        g[i, j] = True
    return g


def test_image_only_selection_has_no_lift_and_full_sensitivity():
    """The same kept set (objects 1 and 2 and background, not 3) for three questions about different objects:
    lift averages to 0 over the asked objects by hand, every pair's IoU is 1."""
    from vlprune.tasks.grounding import lift_values, question_selection, relevance, sensitivity_pairs

    labels, kept = _scene(), _grid((0, 0), (0, 3), (1, 1), (2, 2))
    recs = [{"question_id": q, "image": "a.png", "objects": [k], **question_selection(kept, labels, [k])}
            for q, k in enumerate((1, 2, 3))]
    assert [r["asked"] for r in recs] == [1.0, 1.0, 0.0]
    assert [r["others"] for r in recs] == [0.5, 0.5, 1.0]  # of 2 and 3 one survives; of 1 and 2 both
    assert lift_values(recs) == [0.5, 0.5, -1.0]  # mean 0: no object favoured
    assert sensitivity_pairs(recs) == [1.0, 1.0, 1.0]
    rel = relevance(recs)
    assert rel["lift"] == pytest.approx(0.0) and rel["sensitivity"] == 1.0 and rel["survival"] == pytest.approx(2 / 3)
    assert rel["questions"] == 3 and rel["pairs"] == 3


def test_selection_that_keeps_exactly_the_asked_object():
    """Each question keeps its own object's patch and one background patch: lift 1; sensitivity by hand: the
    sets {0, 10}, {3, 10}, {12, 15} pairwise: IoU 1/3, 0, 0."""
    from vlprune.tasks.grounding import question_selection, relevance, sensitivity_pairs, split_scores

    labels = _scene()
    kept = {1: _grid((0, 0), (2, 2)), 2: _grid((0, 3), (2, 2)), 3: _grid((3, 0), (3, 3))}
    recs = [{"question_id": f"q{k}", "image": "a.png", "objects": [k], **question_selection(kept[k], labels, [k])}
            for k in (1, 2, 3)]
    assert all(r["asked"] == 1.0 and r["others"] == 0.0 and r["survived"] for r in recs)
    assert recs[0]["precision"] == 0.5 and recs[0]["recall"] == 1.0 and recs[0]["kept"] == [0, 10]
    assert sensitivity_pairs(recs) == pytest.approx([1 / 3, 0.0, 0.0])
    rel = relevance(recs)
    assert rel["lift"] == 1.0 and rel["sensitivity"] == pytest.approx(1 / 9)
    # the accuracy split: every question's object survived
    assert split_scores(recs, {"q1": 1.0, "q2": 0.0, "q3": 1.0}) == {"survived": [1.0, 0.0, 1.0], "lost": []}


def test_several_and_zero_objects_and_pairs():
    from vlprune.tasks.grounding import iou, question_selection, relevance, sensitivity_pairs, split_scores

    labels, kept = _scene(), _grid((0, 0))
    two = question_selection(kept, labels, [1, 2])  # a count / relation question: 1 survives, 2 does not
    assert two["asked"] == 0.5 and two["others"] == 0.0 and two["survived"] is False
    assert two["recall"] == 0.5 and two["precision"] == 1.0
    none = question_selection(kept, labels, [])  # "is there a ...?" -> "no": no asked object
    assert none["asked"] is None and none["survived"] is None and none["kept"] == [0]
    only = question_selection(_grid((0, 0)), np.where(labels == 1, 1, 0).astype(np.uint8), [1])
    assert only["others"] is None  # no other object in the image: no lift for this question
    recs = [{"question_id": 1, "image": "a", "objects": [1, 2], **two},
            {"question_id": 2, "image": "a", "objects": [], **none},
            {"question_id": 3, "image": "a", "objects": [2, 1], **two},  # the same object set: no pair
            {"question_id": 4, "image": "b", "objects": [1], **only}]
    assert sensitivity_pairs(recs) == []
    rel = relevance(recs)
    assert rel["questions"] == 3 and rel["lift_questions"] == 2 and rel["sensitivity"] is None
    assert split_scores(recs, {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}) == {"survived": [1.0], "lost": [0.0, 1.0]}
    assert iou([], []) == 1.0 and iou([1, 2], [2, 3]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="square"):
        question_selection(np.zeros((2, 3), bool), labels, [1])


def test_kept_grid_reads_the_last_reduction_of_a_trace():
    """TRIPS at one layer: the kept grid has as many patches as tokens kept alone; no reduction keeps all."""
    from vlprune.tasks.grounding import kept_grid

    cfg = vlprune.load_preset("tiny")
    model = vlprune.build_model(cfg, method=ReduceConfig("evit", layers=(2,), keep=0.5)).eval()
    g = cfg.vision.grid
    ids = torch.ones(2, 4, dtype=torch.long)
    with torch.inference_mode():
        out = model(torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size), ids, torch.ones_like(ids), trace=True)
    recs = [r for r in model.trace_records(out) if r[0] in ("vision", "joint")]
    k = kept_grid(recs, 1, g)
    assert k.shape == (g, g) and k.sum() == math.ceil(0.5 * g * g)
    assert kept_grid([], 0, g).all()
