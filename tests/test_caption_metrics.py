"""Caption metrics: pycocoevalcap's scorers, fed by its PTB tokenizer (Java) or the Python tokenisation, give the
same scores on fixtures of ordinary captions; the caption files' errors name the file and the entry."""

from __future__ import annotations

import json

import pytest

from vlprune.data.caption_formats import (coco_references, image_id_of, load_caption_test, load_references,
                                          pre_caption)
from vlprune.tasks.caption_metrics import caption_scores, have_java, python_tokenize, tokenize

REFS = {
    391895: ["A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road on the countryside.",
             "A man riding on the back of a motorcycle.", "A man in a red shirt and a red hat is on a motorcycle on a hill side."],
    522418: ["A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake.",
             "A woman wearing a hair net cutting a large sheet cake.", "there is a woman that is cutting a white cake"],
    184613: ["A child holding a flowered umbrella and petting a yak.", "A young man holding an umbrella next to a herd of cattle.",
             "a young boy barefoot holding an umbrella touching the horn of a cow", "A boy holding an umbrella while standing next to livestock."],
    7: ["the small red circle is left of the blue square", "three shapes on a striped background, a red circle, a blue square!"],
}
RES = {391895: "a man riding a motorcycle on a dirt road", 522418: "a woman cutting a cake with a knife",
       184613: "a boy holding an umbrella next to a cow", 7: "a red circle left of a blue square"}


def test_python_tokenisation_matches_ptb_on_ordinary_captions():
    tricky = {1: ["The man's dog isn't here -- it's gone... (really) \"yes\" 3.5 ok; e-mail", "Two dogs, one cat: fine!"]}
    if have_java():
        ptb, used = tokenize({**tricky, **REFS}, "ptb")
        assert used == "ptb"
        py, _ = tokenize({**tricky, **REFS}, "python")
        assert py == ptb
    assert python_tokenize("A man's bike (red), isn't it?") == "a man 's bike -lrb- red -rrb- is n't it"


def test_scores_equal_with_either_tokenizer_and_sane_bounds():
    py, per, used = caption_scores(RES, REFS, "python")
    assert used == "python" and set(py) >= {"Bleu_4", "CIDEr", "ROUGE_L"}
    assert len(per["CIDEr"]) == 4 and py["CIDEr"] == pytest.approx(sum(per["CIDEr"]) / 4)
    if have_java():
        ptb, _, used = caption_scores(RES, REFS, "ptb")
        assert used == "ptb" and ptb == pytest.approx(py)
    same, _, _ = caption_scores({i: r[0] for i, r in REFS.items()}, {i: [r[0]] for i, r in REFS.items()}, "python")
    assert same["Bleu_4"] == pytest.approx(100.0) and same["ROUGE_L"] == pytest.approx(100.0)


def test_scores_match_pycocoevalcap_scorers_directly():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [python_tokenize(c) for c in r] for i, r in REFS.items()}
    res = {i: [python_tokenize(RES[i])] for i in REFS}
    ours, _, _ = caption_scores(RES, REFS, "python")
    assert ours["CIDEr"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    assert ours["ROUGE_L"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0])


def test_score_errors():
    with pytest.raises(ValueError, match="empty result list"):
        caption_scores({}, REFS, "python")
    with pytest.raises(ValueError, match="no reference captions for image_id 5"):
        caption_scores({5: "a cat"}, REFS, "python")
    with pytest.raises(ValueError, match="no generated caption for image_id"):
        caption_scores({7: "a cat"}, REFS, "python")


def test_caption_files(tmp_path):
    assert pre_caption('A "Red" circle!  (left) of: the square.') == "a red circle left of the square"
    assert image_id_of({"image": "val2014/COCO_val2014_000000391895.jpg"}, "f", 0) == 391895
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": REFS[391895]},
                                {"image": "images/000007.png", "caption": REFS[7]}]))
    entries = load_caption_test(test)
    assert [e["image_id"] for e in entries] == [391895, 7]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(coco_references(entries)))
    assert load_references(gt, [391895, 7]) == {391895: REFS[391895], 7: REFS[7]}
    with pytest.raises(ValueError, match=r"gt\.json: no reference caption for 1 of the 2 .*image_id 8.*another split"):
        load_references(gt, [391895, 8])
    test.write_text(json.dumps([{"image": "a/1.png", "caption": ["x"]}, {"image": "b/1.png", "caption": ["y"]}]))
    with pytest.raises(ValueError, match=r"test\.json: entries 0 and 1 have the same image id 1"):
        load_caption_test(test)
    test.write_text(json.dumps([{"image": "a/1.png", "caption": []}]))
    with pytest.raises(ValueError, match=r"test\.json: entry 0 field 'caption' must be a non-empty list"):
        load_caption_test(test)
