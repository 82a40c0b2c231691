"""The report pieces the demo uses: curve plots, sectioned reports, and the sentences generated from numbers."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from vlprune.demo import QUICK
from vlprune.demo.summary import compare, fmt_p, sentences, task_sentences
from vlprune.viz.plots import Series, plot_curves
from vlprune.viz.report import Figure, Section, Table, write_sections


def test_plot_curves_and_sections(tmp_path):
    s = [Series("a", [1.0, 2.0, None], [50.0, 60.0, 70.0], [45.0, 55.0, 65.0], [55.0, 65.0, 75.0], labels=["x", "y", "z"]),
         Series("tuned", [1.5], [58.0], line=False, marker="s", color=0)]
    png = plot_curves(s, tmp_path / "c.png", "GFLOPs", "acc", title="t", reference=("unpruned", 2.5, 61.0),
                      band=("blind", 30.0, 25.0, 35.0))
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves([Series("empty", [None], [1.0])], tmp_path / "e.png", "x", "y")
    md, html = write_sections(tmp_path, "T", [
        Section("One", text=["a sentence"], bullets=["b1"], tables=[Table([{"m": "trips", "v": 1.234}], [("m", "method", ""), ("v", "value", ".1f")], "cap")]),
        Section("Two", figures=[Figure(png, "the curve")])])
    text = md.read_text()
    assert "## One" in text and "a sentence" in text and "- b1" in text and "| trips | 1.2 |" in text and "*cap*" in text
    assert "![the curve](c.png)" in text
    page = html.read_text()
    assert "<h2>Two</h2>" in page and '<img src="c.png"' in page and "<li>b1</li>" in page


def _rows(u, b):
    return [{"method": "none", "setup": "fine-tuned unpruned", "vqa_acc": u, "vqa_low": u - 4, "vqa_high": u + 4},
            {"method": "blind", "setup": "image replaced by grey", "vqa_acc": b, "vqa_low": b - 4, "vqa_high": b + 4}]


def test_sentences_say_when_the_comparison_is_uninformative():
    prof = QUICK
    n = 200
    good, blind = [1.0] * 150 + [0.0] * 50, [1.0] * 60 + [0.0] * 140
    trips, evit = [1.0] * 120 + [0.0] * 80, [1.0] * 90 + [0.0] * 110
    tests = [{"a": "none", "b": "blind", "setup": "fine-tuned", "keep": None, **compare(good, blind, 500)},
             {"a": "trips", "b": "evit", "setup": "at inference", "keep": min(prof.sweep), **compare(trips, evit, 500)},
             {"a": "trips", "b": "random", "setup": "at inference", "keep": min(prof.sweep), **compare(trips, trips, 500)}]
    rows = _rows(75.0, 30.0) + [{"method": "chance", "setup": "uniform over 9 answers", "r_mean": 10.0}]
    rows[0]["r_mean"] = 35.0
    said, clear = sentences(prof, rows, tests)
    assert "Retrieval (unpruned): r_mean 35.0 against 10.0 for a random ranking (3.5x chance)." in said[1]
    assert clear and "the model uses the image" in said[1] and said[0].startswith("Smoke run")
    assert "TRIPS (60.0%) is 15.0 points above EViT (45.0%" in said[2] and "McNemar p < 0.001" in said[2]
    assert "TRIPS (60.0%) is not significantly different from random (60.0%)" in said[3]
    tests[0] = {"a": "none", "b": "blind", "setup": "fine-tuned", "keep": None, **compare(blind, blind, 500)}
    said, clear = sentences(prof, _rows(30.0, 30.0), tests)
    assert not clear and "not clearly above the blind baseline" in said[1] and "uninformative" in said[1]
    assert fmt_p(0.0123) == "p = 0.012" and fmt_p(None) == "n/a" and fmt_p(0.0004) == "p < 0.001"
    # the paired test behind the sentence: 30 questions TRIPS alone gets right, 0 EViT alone: exact McNemar
    # does not apply (30 >= 25): chi-square (|30 - 0| - 1)^2 / 30
    t = compare(trips, evit, 500)
    assert t["discordant"] == [30, 0] and t["diff"] == pytest.approx(15.0) and len(good) == len(blind) == n
    assert t["p_mcnemar"] == pytest.approx(math.erfc(math.sqrt(29 ** 2 / 30 / 2)))


N = 40
PROF = SimpleNamespace(name="t", sweep=(0.9, 0.35, 0.25), n_boot=300, matched_keeps=(0.35, 0.25), main_keep=0.35)


def _ev(method, keep, gflops, right, guided):
    """A hand-made evaluation of N questions, two per image about different objects: a guided selection keeps
    exactly the asked object (lift 1, the pair's patch sets disjoint), an unguided one keeps one object of two
    whatever the question (lift 0, IoU 1)."""
    recs = [{"question_id": q, "image": f"i{q // 2}", "objects": [1 + q % 2], "asked": 1.0 if guided else float(q % 2 == 0),
             "others": 0.0 if guided else float(q % 2 == 1), "survived": guided or q % 2 == 0, "precision": 0.5,
             "recall": 0.5} for q in range(N)]
    scores = [1.0] * right + [0.0] * (N - right)
    return {"method": method, "setup": "at inference", "keep": keep, "gflops": gflops, "accuracy": 100.0 * right / N,  # percent, as the pipeline stores it
            "scores": scores, "grounding": {"records": recs, "pairs_iou": [0.0 if guided else 1.0] * (N // 2),
                                            "survival": 1.0, "questions": N}}


def _res(trips_right, rival_right):
    vqa = {}
    for keep, g in ((0.9, 0.3), (0.35, 0.2), (0.25, 0.16)):
        vqa[f"trips-k{keep:g}"] = _ev("trips", keep, g, trips_right, True)
        for m in ("evit", "tome", "random", "elip"):
            vqa[f"{m}-k{keep:g}"] = _ev(m, keep, g, rival_right, False)
    for keep, g, right in ((0.9, 0.28, 28), (0.35, 0.18, 24), (0.25, 0.10, 16)):  # 70%, 60%, 40%
        vqa[f"lowres-k{keep:g}"] = _ev("lowres", keep, g, right, False)
    return {"vqa": vqa}


def test_relevance_rows_matched_points_and_guidance_sentences():
    from vlprune.demo.relevance import guidance_sentences, matched, relevance_rows

    res = _res(36, 20)
    rel = relevance_rows(res, list(range(N)), PROF.n_boot)
    by = {r["key"]: r for r in rel}
    assert by["trips-k0.25"]["lift"]["mean"] == 1.0 and by["evit-k0.25"]["lift"]["mean"] == 0.0
    assert by["trips-k0.25"]["sensitivity"]["mean"] == 0.0 and by["evit-k0.25"]["sensitivity"]["mean"] == 1.0
    # the accuracy split: TRIPS kept every asked object (36 of 40 right); EViT lost the odd questions' objects
    assert by["trips-k0.25"]["acc_survived"]["mean"] == pytest.approx(90.0) and by["trips-k0.25"]["acc_lost"]["n"] == 0
    assert by["evit-k0.25"]["acc_survived"]["n"] == by["evit-k0.25"]["acc_lost"]["n"] == 20
    assert by["evit-k0.25"]["acc_survived"]["mean"] == pytest.approx(50.0)  # right: questions 0..19, half even
    m = {(r["keep"], r["method"]): r for r in matched(PROF, res, (0.35, 0.25))}
    lo = m[(0.25, "lowres")]  # TRIPS at 0.16 GFLOPs: lowres between 0.10 (40%) and 0.18 (60%): 55%
    assert lo["acc_interp"] == pytest.approx(55.0) and lo["near_key"] == "lowres-k0.35"
    assert lo["near_gap"] == pytest.approx(0.18 / 0.16 - 1) and lo["test"]["diff"] == pytest.approx(90.0 - 60.0)
    assert m[(0.35, "lowres")]["acc_interp"] == pytest.approx(62.0)  # 0.2 between 0.18 (60%) and 0.28 (70%)
    assert m[(0.35, "evit")]["near_key"] == "evit-k0.35" and m[(0.35, "evit")]["test"]["discordant"] == [16, 0]
    said = guidance_sentences(PROF, rel, list(m.values()), res)
    assert said[0].startswith("Text relevance at keep 0.25: TRIPS keeps the asked-about object more often than the "
                              "other objects by 1.00 [1.00, 1.00] (relevance lift; EViT 0.00 [")
    assert "its selection follows the question more than EViT's" in said[0]
    assert "question sensitivity (IoU of the patches kept for two questions about different objects, 1 = the same) " \
           "is 0.00 [0.00, 0.00]: the question changes which patches it keeps" in said[0]
    assert "ELIP" in said[1] and "follows the question less than EViT's" not in said[1]
    assert said[2].startswith("At the GFLOPs of TRIPS at keep 0.35 (0.2 per image), TRIPS scores 90.0%")
    assert said[2].endswith("the text's guidance helped against EViT, ToMe, random, lowres.")


def test_guidance_sentences_say_so_when_the_text_did_not_help():
    """Equal accuracy and a TRIPS that selects like EViT: the sentences say the guidance did not help."""
    from vlprune.demo.relevance import findings, guidance_sentences, matched, relevance_rows

    res = _res(8, 8)
    for k in ("trips-k0.9", "trips-k0.35", "trips-k0.25"):
        res["vqa"][k] = _ev("trips", res["vqa"][k]["keep"], res["vqa"][k]["gflops"], 8, False)
    rel = relevance_rows(res, list(range(N)), PROF.n_boot)
    said = guidance_sentences(PROF, rel, matched(PROF, res, (0.35, 0.25)), res)
    assert "paired bootstrap p = 1.000: no evidence that its selection follows the question more than EViT's" in said[0]
    assert "the question does not measurably change which patches it keeps" in said[0]
    # a selection that moves for a few questions only (IoU 0.97 [0.96, 0.98]) is not called question-driven
    rel97 = [dict(r, sensitivity={"mean": 0.97, "low": 0.96, "high": 0.98}) if r["key"] == "trips-k0.25" else r
             for r in rel]
    said97 = guidance_sentences(PROF, rel97, matched(PROF, res, (0.35, 0.25)), res)
    assert "is 0.97 [0.96, 0.98]: the question changes only a few of the patches it keeps" in said97[0]
    # lowres (60% and 70% at its nearest points) is far above TRIPS (20%): said so
    assert said[2].endswith("the text's guidance did not measurably help against any of them; TRIPS is "
                            "significantly below lowres.")
    # every method's lift, sensitivity and accuracy the same at every keep: flagged as findings
    per_type = [{"setup": "at inference", "keep": 0.35, "method": m, "types": {"colour": 50.0, "count": 10.0 * i}}
                for i, m in enumerate(("trips", "evit", "tome"))]
    found = findings(PROF, rel, res, per_type)
    assert "Finding: every method has the same accuracy on colour questions at keep 0.35 (50): this table does not " \
           "tell them apart." in found and not any("count questions" in f for f in found)
    assert "Finding: every method has the same relevance lift at keep 0.25 (0): this table does not tell them apart." in found
    assert any("question sensitivity at keep 0.9 (1)" in f for f in found)
    assert any("VQA accuracy at keep 0.35 (20)" in f for f in found)


def test_type_accuracy_checks_and_objects_to_budget(tmp_path):
    from PIL import Image

    from vlprune.demo.relevance import check_sentence, checks, objects_to_budget, per_type_rows, type_accuracy

    types = ["colour", "count", "colour", "count"]
    assert type_accuracy([1.0, 0.0, 0.0, 0.0], types) == {"colour": {"acc": 50.0, "n": 2}, "count": {"acc": 0.0, "n": 2}}
    with pytest.raises(ValueError, match="3 scores for 4 typed questions"):
        type_accuracy([1.0, 0.0, 0.0], types)
    res = {"vqa": {"none": {"method": "none", "setup": "fine-tuned unpruned", "keep": 1.0, "scores": [1.0, 1.0, 1.0, 0.0],
                            "accuracy": 75.0},
                   "vqa-blind": {"method": "blind", "setup": "blind", "scores": [0.0, 0.0, 1.0, 0.0], "accuracy": 25.0}}}
    rows = per_type_rows(res, types)
    assert rows[0]["over_blind"] == {"colour": 50.0, "count": 50.0} and rows[-1]["method"] == "blind"
    more = {"vqa": {**res["vqa"], "vqa-none-s1": {"method": "none", "setup": "fine-tuned unpruned", "seed": 1,
                                                   "scores": [1.0, 0.0, 1.0, 0.0]},
                    "vqa-trips-s2": {"method": "trips", "setup": "fine-tuned with it", "seed": 2, "keep": 0.35,
                                     "scores": [0.0, 0.0, 1.0, 0.0]}}}
    setups = {r["key"]: r["setup"] for r in per_type_rows(more, types)}  # a further seed's row says which
    assert setups["vqa-none-s1"] == "fine-tuned unpruned, seed 1" and setups["vqa-trips-s2"] == "fine-tuned with it, seed 2"
    assert setups["none"] == "fine-tuned unpruned"
    match = [{"method": "lowres", "keep": 0.35, "acc_interp": 70.0, "near_acc": 50.0}]
    cs = checks(res, [{"diff": 50.0}], rows, match, {"ratio": 1.5})
    assert [(c["value"], c["met"]) for c in cs] == [(50.0, True), (50.0, True), (50.0, True), (5.0, False), (1.5, False)]
    assert check_sentence(cs) == ("2 of 5 targets of the benchmark are not met: lowres at the GFLOPs of TRIPS keep "
                                  "0.35, below unpruned (points); objects-to-budget ratio at keep 0.25.")
    # the ratio from scenes.json and the masks: one test image whose two objects cover 2 + 3 patches of a 4x4
    # grid; budget at keep 0.25: 4 patches -> 1.25
    (tmp_path / "masks").mkdir()
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[0:2, 0:4] = 1
    labels[4:6, 0:6] = 2
    Image.fromarray(labels).save(tmp_path / "masks" / "a.png")
    (tmp_path / "vqa_test.json").write_text(json.dumps([{"image": "images/a.png"}]))
    (tmp_path / "scenes.json").write_text(json.dumps({"scenes": [
        {"image": "images/a.png", "mask": "masks/a.png", "objects": [{"id": 1}, {"id": 2}]},
        {"image": "images/b.png", "mask": "masks/missing.png", "objects": [{"id": 1}]}]}))  # train image: not read
    r = objects_to_budget(tmp_path, grid=4, size=8)
    assert r["ratio"] == pytest.approx(5 / 4) and r["budget"] == 4 and r["images"] == 1
    (tmp_path / "card.json").write_text(json.dumps({"objects_to_budget": 2.4}))  # the data step's own number wins
    assert objects_to_budget(tmp_path, grid=4, size=8) == {"ratio": 2.4, "source": "card.json"}


def test_pick_questions_for_the_side_by_side_overlay():
    from vlprune.demo.steps import pick_questions

    e = lambda q, img, objs, t: {"question_id": q, "image": img, "objects": objs, "type": t}  # noqa: E731
    entries = [e(1, "a", [1], "colour"), e(2, "a", [1], "shape"), e(3, "a", [2], "count"), e(4, "a", [], "exists"),
               e(5, "b", [1], "colour"), e(6, "b", [2], "colour"), e(7, "b", [1, 3], "left")]
    img, qs = pick_questions(entries, 3)
    assert img == "b" and [q["question_id"] for q in qs] == [5, 7, 6]  # different types first
    img, qs = pick_questions(entries, 2)
    assert img == "a" and [q["question_id"] for q in qs] == [1, 3]  # one question per object set
    assert pick_questions([e(1, "a", [1], "colour"), e(2, "a", [1], "shape"), e(3, "b", [], "exists")], 3) is None


def test_caption_and_grounding_sentences_compare_with_the_baseline():
    cap = [{"method": "none", "CIDEr": 90.0, "CIDEr_low": 80.0, "CIDEr_high": 100.0},
           {"method": "evit", "CIDEr": 50.0, "CIDEr_low": 40.0, "CIDEr_high": 60.0},
           {"method": "blind (grey image)", "CIDEr": 30.0, "CIDEr_low": 25.0, "CIDEr_high": 35.0}]
    ground = [{"method": "none", "accuracy": 30.0, "accuracy_low": 20.0, "accuracy_high": 40.0},
              {"method": "random box", "accuracy": 25.0, "accuracy_low": 22.0, "accuracy_high": 28.0}]
    said = task_sentences({"caption": cap, "grounding_refs": ground})
    assert said[0] == ("Captioning (unpruned): CIDEr 90.0 [80.0, 100.0] against 30.0 [25.0, 35.0] for the blind "
                       "captioner (3.0x; the intervals do not overlap).")
    assert said[1].startswith("Grounding of referring expressions (unpruned): accuracy 30.0 [20.0, 40.0] against 25.0")
    assert "(1.2x; the intervals overlap: the model is not clearly above the baseline)" in said[1]
    assert task_sentences({"caption": None}) == []
