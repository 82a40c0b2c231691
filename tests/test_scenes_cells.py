"""The cells family of the scenes data (the text-relevance benchmark): its measured properties, its answers
re-derived from the object list, its masks, determinism, and clear errors for bad settings."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlprune.cli import main
from vlprune.data.scenes import generate
from vlprune.data.scenes_card import check_budget, covered_patches
from vlprune.data.scenes_cells import CELL_QUESTION_TYPES, MARKS, PATTERNS, cell_answer, pattern_offset, side_of

SETTINGS = dict(images=48, seed=5, image_size=96, min_objects=10, max_objects=13, family="cells", grid=4)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("cells")
    summary = generate(out, **SETTINGS)
    return out, summary


def _scenes(root):
    return {s["image"]: s for s in json.loads((root / "scenes.json").read_text())["scenes"]}


def _vqa(root):
    return json.loads((root / "vqa_train.json").read_text()) + json.loads((root / "vqa_test.json").read_text())


def test_answers_rederived_from_objects_and_every_type_present(cells):
    root, _ = cells
    sc = _scenes(root)
    vqa = _vqa(root)
    assert {q["type"] for q in vqa} == set(CELL_QUESTION_TYPES)
    for q in vqa:
        assert cell_answer(q["question"], sc[q["image"]]["objects"]) == q["answer"][0], q


def test_objects_cover_twice_the_budget_at_keep_quarter(cells):
    root, summary = cells
    covered = []
    for s in _scenes(root).values():  # recount from the written masks, naively, patch by patch
        lab = np.array(Image.open(root / s["mask"]))
        covered.append(sum(lab[y:y + 8, x:x + 8].any() for y in range(0, 96, 8) for x in range(0, 96, 8)))
        assert set(np.unique(lab)) - {0} == {o["id"] for o in s["objects"]}
    budget = int(0.25 * 144)
    assert np.mean(covered) / budget >= 2.0
    assert summary["card"]["objects_to_budget"]["mean"] == pytest.approx(np.mean(covered) / budget, abs=0.01)


def test_answers_balanced_per_type(cells):
    root, summary = cells
    for t in CELL_QUESTION_TYPES:
        c = Counter(q["answer"][0] for q in _vqa(root) if q["type"] == t)
        assert max(c.values()) / sum(c.values()) <= 2.0 / len(c), (t, c)
        assert summary["card"]["answers"][t]["max_share_over_uniform"] <= 2.0


def test_several_questions_per_image_about_different_objects(cells):
    root, _ = cells
    by = {}
    for q in _vqa(root):
        by.setdefault(q["image"], []).append(q)
    assert np.mean([len(v) for v in by.values()]) >= 3.5
    # the pairs question sensitivity needs: two questions of one image about different objects. Expected in the
    # images with both marks (MARK_P ** 2 = 36%): the colour (or side) of the striped and of the checked thing
    pairs = [len({q["objects"][0] for q in v if len(q["objects"]) == 1}) >= 2 for v in by.values()]
    assert 0.2 <= np.mean(pairs) <= 0.55


def test_marks_are_unique_in_a_scene_and_name_one_object(cells):
    root, _ = cells
    seen = Counter()
    for s in _scenes(root).values():
        pats = [o["pattern"] for o in s["objects"]]
        for m in MARKS:
            assert pats.count(m) <= 1
            seen[m] += pats.count(m)
        assert set(pats) <= set(PATTERNS)
    assert all(0.3 < seen[m] / 48 < 0.9 for m in MARKS), seen  # each mark in some scenes, not all


def test_side_is_the_half_of_the_grid():
    assert side_of({"cell": [0, 1]}, 4) == "left" and side_of({"cell": [3, 2]}, 4) == "right"
    assert side_of({"cell": [0, 1]}, 3) is None and side_of({"cell": [0, 0]}, 3) == "left"


def test_named_objects_have_distractors_sharing_colour_or_shape(cells):
    root, summary = cells
    sc = _scenes(root)
    pat = [q for q in _vqa(root) if q["type"] == "colour"]
    shared = []
    for q in pat:
        objs = sc[q["image"]]["objects"]
        o = next(p for p in objs if p["id"] == q["objects"][0])
        shared.append(any(p is not o and (p["colour"] == o["colour"] or p["shape"] == o["shape"]) for p in objs))
    assert np.mean(shared) >= 0.9 and summary["card"]["distractor_share"] >= 0.9


def test_patterns_keep_the_mean_colour_and_vanish_when_shrunk():
    yy, xx = np.mgrid[0:8, 0:8]
    for p in PATTERNS:
        assert abs(pattern_offset(p, xx, yy).mean()) < 1e-9  # mean-preserving
    assert np.ptp(pattern_offset("striped", xx, yy)) > 50 and np.ptp(pattern_offset("checked", xx, yy)) > 50
    with pytest.raises(ValueError, match="valid patterns"):
        pattern_offset("dotted", xx, yy)


def test_deterministic_and_prefix_stable(cells, tmp_path):
    root, _ = cells
    generate(tmp_path / "a", **{**SETTINGS, "images": 12})
    a = _scenes(tmp_path / "a")
    b = _scenes(root)
    for k in a:  # image i depends only on (seed, i): the first 12 of 48 are the same images
        assert a[k]["objects"] == b[k]["objects"]
        assert (tmp_path / "a" / k).read_bytes() == (root / k).read_bytes()
    generate(tmp_path / "b", **{**SETTINGS, "images": 12})
    h = [hashlib.sha256((tmp_path / d / "vqa_train.json").read_bytes()).hexdigest() for d in ("a", "b")]
    assert h[0] == h[1]
    generate(tmp_path / "c", **{**SETTINGS, "images": 12, "seed": 6})
    assert _scenes(tmp_path / "c")["images/000000.png"]["objects"] != a["images/000000.png"]["objects"]


def test_covered_patches_counts_touched_patches():
    lab = np.zeros((16, 16), dtype=np.uint8)
    lab[7:9, 7:9] = 1  # one 2x2 blob on the corner of four 8 px patches
    assert covered_patches(lab, 8) == 4
    assert covered_patches(lab, 16) == 1


def test_bad_settings_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"valid families"):
        generate(tmp_path / "x", images=8, family="blobs")
    with pytest.raises(ValueError, match=r"\['colour', 'exists', 'count', 'side'\]"):
        generate(tmp_path / "x", images=8, family="cells", image_size=96, question_types=("pattern",))
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, "):
        generate(tmp_path / "x", images=8, seed=-3)
    with pytest.raises(ValueError, match=r"seed must be"):
        generate(tmp_path / "x", images=8, seed=2**40)
    with pytest.raises(ValueError, match=r"leaves 7 tokens, fewer than the 13 objects"):
        generate(tmp_path / "x", images=8, family="cells", image_size=96, max_objects=13, card_keep=0.05)
    with pytest.raises(ValueError, match=r"max_objects <= 16"):
        generate(tmp_path / "x", images=8, family="cells", image_size=96, max_objects=17)
    with pytest.raises(ValueError, match=r"grid must be"):
        generate(tmp_path / "x", images=8, family="cells", image_size=96, grid=9)
    with pytest.raises(ValueError, match=r"leaves 3 tokens"):
        check_budget(4, 16, 0.2)


def test_cli_prints_the_card(tmp_path, capsys):
    assert main(["data", "scenes", "--out", str(tmp_path / "s"), "--images", "8", "--family", "cells",
                 "--image-size", "96", "--min-objects", "10", "--max-objects", "12"]) == 0
    out = capsys.readouterr().out
    assert "objects-to-budget ratio" in out and "colour:" in out and "largest answer" in out
    assert json.loads((tmp_path / "s" / "card.json").read_text())["family"] == "cells"
    assert main(["data", "scenes", "--out", str(tmp_path / "t"), "--images", "8", "--family", "cells",
                 "--question-types", "colour,pattern"]) == 2
    assert "colour, exists, count, side" in capsys.readouterr().err.replace("'", "")
    assert main(["data", "scenes", "--out", str(tmp_path / "u"), "--images", "8", "--seed", "-1"]) == 2
    assert "seed must be" in capsys.readouterr().err


def test_profile_validation_refuses_a_keep_below_the_object_count():
    from dataclasses import replace

    from vlprune.demo.profiles import PROFILES, QUICK, validate

    assert QUICK.scenes.family == "cells" and PROFILES["default"].scenes.family == "cells"
    bad = replace(QUICK, sweep=(0.5, 0.05), main_keep=0.5)  # 64 patches: keep 0.05 leaves 3 tokens < 4 objects
    with pytest.raises(ValueError, match=r"profile quick: keep 0.05 of 64 patches leaves 3 tokens, fewer than the 4"):
        validate(bad)


def test_captions_and_expressions_are_about_the_marked_objects(cells, tmp_path):
    """Captions name each marked object's mark and colour (and only those); expressions name a marked object by its
    mark and point at its box; plain objects get none; a scene without marks gets the plain captions."""
    import re

    from vlprune.data.scenes_cells import cell_captions, cell_expression
    from vlprune.data.scenes_refs import object_boxes, write_scenes_refs

    import shutil

    root = tmp_path / "d"
    shutil.copytree(cells[0], root)
    scenes = list(_scenes(root).values())
    assert any(not any(o["pattern"] in MARKS for o in sc["objects"]) for sc in scenes)  # a scene without marks
    for i, sc in enumerate(scenes):
        caps = cell_captions(np.random.default_rng(i), sc, n=3)
        marked = {o["pattern"]: o["colour"] for o in sc["objects"] if o["pattern"] in MARKS}
        assert len(set(caps)) == len(caps) >= 2
        for c in caps:
            said = dict((m, col) for m, col in re.findall(r"\b(striped|checked) (\w+) (?:thing|one)", c))
            assert said == marked, (c, marked)
            if not marked:
                assert "plain shapes" in c
        for o in sc["objects"]:
            x = cell_expression(o, sc["objects"])
            assert (x == f"the {o['pattern']} thing") if o["pattern"] in MARKS else x is None
    write_scenes_refs(root)
    ground = json.loads((root / "grounding_test.json").read_text())
    by_image = {sc["image"]: sc for sc in scenes}
    assert ground
    for g in ground:
        sc = by_image[g["image"]]
        o = next(o for o in sc["objects"] if o["pattern"] == g["text"].split()[1])
        assert g["bbox"] == object_boxes(sc, root)[o["id"]]
