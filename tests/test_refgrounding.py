"""Grounding: ALBEF's IoU and box choice on hand-made heat maps, mass-conserving heat redistribution through
provenance, the random-box baseline, bad input, and Grad-CAM on a tiny model (with and without reduction)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vlprune
from vlprune.tasks.refgrounding import (box_scores, gradcam_heat, heat_to_grid, iou, kept_fraction, load_grounding,
                                        pick_box, random_box_accuracy)

torch.set_num_threads(1)


def test_iou_inclusive_pixels_as_albef():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    # overlap columns 5..9 (5 px) of rows 0..9: inter (9-5+1)*(9-0+1) = 50, union 100 + 100 - 50
    assert iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 0, 5, 5]) == 0.0  # touching: x1 < x2 fails


def test_box_choice_on_hand_made_heat():
    heat = torch.zeros(20, 20)
    heat[12:16, 2:6] = 1.0  # a hot 4x4 block at x 2..5, y 12..15
    boxes = [[0, 0, 10, 10], [2, 12, 4, 4], [0, 10, 20, 10]]
    s = box_scores(heat, boxes)
    assert s == pytest.approx([0.0, 16 / 4, 16 / (200 ** 0.5)])
    assert pick_box(heat, boxes) == 1
    assert pick_box(-torch.ones(20, 20), [[0, 0, 2, 2], [0, 0, 1, 1]]) == 1  # all negative: -inf start, not 0


def test_heat_redistribution_conserves_mass_through_provenance():
    # 2x2 grid (4 patches): token 1 keeps patch 1, token 2 fused patches 2 and 3, patch 4 dropped
    src = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    heat = torch.tensor([5.0, 2.0, 3.0])  # [CLS] heat ignored
    g = heat_to_grid(heat, src, 2)
    assert g.tolist() == [[2.0, 1.5], [1.5, 0.0]]
    assert float(g.sum()) == pytest.approx(float(heat[1:].sum()))
    assert heat_to_grid(torch.arange(5.0), None, 2).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    # kept fraction: the left column (patch 1 kept, patch 3 fused) -> 1 of 2; the right column (fused, dropped) -> 0
    assert kept_fraction(src, [0, 0, 10, 20], 2, 20, 20) == 0.5
    assert kept_fraction(src, [10, 0, 10, 20], 2, 20, 20) == 0.0
    assert kept_fraction(None, [10, 0, 10, 20], 2, 20, 20) == 1.0


def test_random_box_baseline_is_the_exact_expectation():
    e = {"bbox": [0, 0, 10, 10], "candidates": [[0, 0, 10, 10], [50, 50, 5, 5], [1, 1, 10, 10], [30, 0, 4, 4]]}
    assert random_box_accuracy([e]) == [0.5]


def _write(tmp_path, entries, name="g.json"):
    p = tmp_path / name
    p.write_text(json.dumps(entries))
    return p


def test_bad_grounding_input_names_file_and_entry(tmp_path):
    good = {"image": "a.png", "text": "the red circle", "bbox": [1, 1, 5, 5], "candidates": [[1, 1, 5, 5]], "width": 32, "height": 32}
    assert load_grounding(_write(tmp_path, [good]))[0]["candidates"] == [[1, 1, 5, 5]]
    p = _write(tmp_path, [good, {**good, "bbox": [30, 30, 10, 10]}])
    with pytest.raises(ValueError, match=r"g\.json: entry 1 bbox .* outside the 32x32 image"):
        load_grounding(p)
    p = _write(tmp_path, [{k: v for k, v in good.items() if k != "candidates"}])
    with pytest.raises(ValueError, match=r"g\.json: entry 0 has no field 'candidates'"):
        load_grounding(p)
    dets = _write(tmp_path, {"7": [[1, 1, 5, 5, 0.9]]}, "dets.json")
    e = load_grounding(_write(tmp_path, [{**{k: v for k, v in good.items() if k != "candidates"}, "image_id": 7}]), str(dets))
    assert e[0]["candidates"] == [[1, 1, 5, 5]]


def test_gradcam_heat_shapes_and_reduction():
    torch.manual_seed(0)
    model = vlprune.build_model("tiny").eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(5, 101, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    heat, image = gradcam_heat(model, images, ids, mask)
    assert heat.shape == (2, 17) and (heat >= 0).all() and image.num_tokens == 17
    assert not any(p.grad is not None for p in model.parameters())  # only the attention map was differentiated
    vlprune.attach(model, vlprune.ReduceConfig("evit", layers=(2,), keep=0.5))
    heat, image = gradcam_heat(model, images, ids, mask)
    assert heat.shape == (2, 10) and image.source is not None
    grid = heat_to_grid(heat[0], image.source[0], 4)
    assert float(grid.sum()) == pytest.approx(float(heat[0, 1:].sum()), rel=1e-5)


def test_scenes_refs_from_a_hand_made_scenes_file(tmp_path):
    from vlprune.data.scenes_refs import referring_expression, unique_phrase, write_scenes_refs

    objs = [{"id": 1, "shape": "triangle", "colour": "red", "size": "small", "bbox": [2, 2, 8, 8], "texture": "striped",
             "material": "wood"},
            {"id": 2, "shape": "triangle", "colour": "red", "size": "large", "bbox": [20, 2, 30, 12]},
            {"id": 3, "shape": "circle", "colour": "blue", "size": "small", "bbox": [5, 20, 12, 27], "center": [8.5, 23.5]}]
    assert unique_phrase(objs[0], objs) == "small triangle"
    assert unique_phrase(objs[2], objs) == "circle"
    rng = np.random.default_rng(0)
    for o in objs:  # every expression picks out its object alone
        expr = referring_expression(o, objs, rng)
        assert expr is not None and expr.startswith("the ")
    scenes = {"image_size": 32, "extra": 1, "scenes": [{"image": f"images/{i:06d}.png", "objects": objs, "lighting": "dim"}
                                                      for i in range(20)]}
    (tmp_path / "scenes.json").write_text(json.dumps(scenes))
    counts = write_scenes_refs(tmp_path)
    assert counts == {"caption_train": 18 * 3, "caption_test": 2, "grounding_test": 6, "grounding_train": 18 * 3}
    train = json.loads((tmp_path / "grounding_train.json").read_text())  # the training images' expressions only
    test_images = {e["image"] for e in json.loads((tmp_path / "grounding_test.json").read_text())}
    assert {e["image"] for e in train}.isdisjoint(test_images) and len({e["image"] for e in train}) == 18
    assert all(e["caption"].startswith("the ") and e["image_id"] == int(e["image"][7:13]) for e in train)
    g = json.loads((tmp_path / "grounding_test.json").read_text())
    assert g[0]["candidates"] == [[2, 2, 6, 6], [20, 2, 10, 10], [5, 20, 7, 7]] and g[0]["bbox"] == [2, 2, 6, 6]
    assert all(e["bbox"] in e["candidates"] for e in g)
    assert load_grounding(tmp_path / "grounding_test.json")[0]["width"] == 32


class _Tok:
    """A word-level stand-in for the scenes tokenizer: one id per word, [CLS] = 1, [SEP] = 2, pad = 0."""

    def __init__(self):
        self.vocab: dict = {}
        self.tok = self

    def _ids(self, text):
        return [self.vocab.setdefault(w, 5 + len(self.vocab)) for w in text.split()]

    def encode(self, texts, max_len=None, add_special_tokens=True):
        if isinstance(texts, str):  # the inner tokenizer's interface: .encode(text).ids
            return type("E", (), {"ids": self._ids(texts)})()
        rows = [[1] + self._ids(t) + [2] for t in texts]
        L = max(map(len, rows))
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
        return ids, (ids > 0).long()


def test_caption_targets_score_the_target_phrase_only():
    from vlprune.tasks.refgrounding import as_caption, caption_targets

    assert as_caption("the small red triangle") == "a small red triangle" and as_caption("the oval") == "an oval"
    ids, mask, score = caption_targets(_Tok(), ["the red circle", "the square left of the blue circle"], 32,
                                       "a picture of ")
    # [CLS] a picture of a red circle [SEP]: positions 3..5 predict "a red circle"; the relation's anchor is not scored
    assert score[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert score[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert int(mask[1].sum()) == 12


def test_caption_heat_matches_decode_and_follows_reduction():
    from vlprune.models.captioner import cross_attention_probs, decode, image_kv
    from vlprune.tasks.refgrounding import caption_heat, caption_targets

    torch.manual_seed(0)
    model = vlprune.build_model("tiny").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids, mask, score = caption_targets(_Tok(), ["the red circle", "the square left of the blue circle"], 32, "a ")
    image = model.encode_image(images)
    with torch.no_grad():
        full, _ = decode(model, ids, mask, image_kv(model, image))
        logits, A = cross_attention_probs(model, ids, mask, image_kv(model, image), 0)
    assert torch.allclose(full, logits, atol=1e-5) and A.shape[-1] == 17
    assert torch.allclose(A.sum(-1), torch.ones(A.shape[:-1]), atol=1e-5)
    heat, image = caption_heat(model, images, ids, mask, score)
    assert heat.shape == (2, 17) and (heat >= 0).all() and float(heat.sum()) > 0
    assert not any(p.grad is not None for p in model.parameters())
    zero, _ = caption_heat(model, images, ids, mask, torch.zeros_like(score))  # nothing scored: no heat
    assert float(zero.abs().sum()) == 0.0
    vlprune.attach(model, vlprune.ReduceConfig("evit", layers=(2,), keep=0.5))
    heat, image = caption_heat(model, images, ids, mask, score)
    assert heat.shape == (2, 10) and image.source is not None
