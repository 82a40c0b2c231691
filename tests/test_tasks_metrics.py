import itertools

import pytest
import torch

from vlprune.tasks.metrics import (
    accuracy, build_answer_vocab, normalize_answer, retrieval_metrics, soft_targets, vqa_accuracy, vqa_score,
)


def naive_recall(sim, img2txt, txt2img):
    """Per-query Python ranking, as in ALBEF's itm_eval written out by hand."""
    n_img, n_txt = sim.shape
    out = {}
    tr = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda t: (-float(sim[i, t]), t))
        tr.append(min(order.index(t) for t in img2txt[i]))
    ir = []
    for t in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-float(sim[i, t]), i))
        ir.append(order.index(txt2img[t]))
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * sum(r < k for r in tr) / n_img
        out[f"img_r{k}"] = 100.0 * sum(r < k for r in ir) / n_txt
    return out


@pytest.mark.parametrize("seed", range(5))
def test_recall_matches_naive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, per = 12, 2
    img2txt = [[2 * i, 2 * i + 1] for i in range(n_img)]
    txt2img = [i for i in range(n_img) for _ in range(per)]
    sim = torch.randn(n_img, n_img * per, generator=g)
    sim = sim.round(decimals=1)  # create ties
    got = retrieval_metrics(sim, img2txt, txt2img)
    ref = naive_recall(sim, img2txt, txt2img)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k
    assert got["r_mean"] == pytest.approx(sum(ref.values()) / 6)


def test_perfect_diagonal_gives_r1_of_100():
    sim = torch.eye(7) + 0.01 * torch.randn(7, 7).abs()
    sim = torch.eye(7) * 10 + sim
    m = retrieval_metrics(sim, [[i] for i in range(7)], list(range(7)))
    assert m["txt_r1"] == m["img_r1"] == m["r_mean"] == 100.0


def test_text_retrieval_any_caption_counts():
    # image 0 has captions 0 and 1; caption 1 ranks first for image 0 -> hit at 1
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.1, 0.8]])
    m = retrieval_metrics(sim, [[0, 1], [2]], [0, 0, 1])
    assert m["txt_r1"] == 100.0
    # caption 0 prefers image 1 (0.2 > 0.1): image retrieval R@1 = 2/3
    assert m["img_r1"] == pytest.approx(200 / 3)


def test_retrieval_shape_errors():
    with pytest.raises(ValueError, match="similarity is 2x3 but there are 1 images"):
        retrieval_metrics(torch.zeros(2, 3), [[0]], [0, 0, 1])


def test_vqa_hand_made_cases():
    assert vqa_score("Two", ["2"]) == 1.0
    assert vqa_score("red", ["blue"]) == 0.0
    ten = ["red"] * 2 + ["blue"] * 8
    # leave-one-out: dropping a "red" leaves 1 red (1/3), dropping a "blue" leaves 2 reds (2/3)
    assert vqa_score("red", ten) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_score("blue", ten) == 1.0
    assert vqa_score("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_score("the cube", ["cube", "cube.", "a cube"]) == 1.0
    assert vqa_accuracy(["red", "blue"], [["red"], ["red"]]) == 50.0
    with pytest.raises(ValueError, match="at least one ground-truth answer"):
        vqa_score("x", [])


def test_vqa_leave_one_out_matches_brute_force():
    answers = ["a1", "a2", "a1", "a3", "a1", "a1", "a2", "a4", "a2", "a1"]
    for pred in ("a1", "a2", "a3", "a5"):
        subsets = list(itertools.combinations(range(10), 9))
        ref = sum(min(sum(answers[j] == pred for j in s) / 3, 1) for s in subsets) / len(subsets)
        assert vqa_score(pred, answers) == pytest.approx(ref)


def test_normalize_and_vocab_and_soft_targets():
    assert normalize_answer("  The Red, cube! ") == "red cube"
    assert normalize_answer("3.5") == "3.5"
    vocab = build_answer_vocab([["red", "Red", "blue"], ["two", "2"]])
    assert vocab == {"red": 0, "2": 1, "blue": 2}
    assert soft_targets(["red", "red", "blue", "green"], vocab) == {0: 2 / 3, 2: 1 / 3}
    assert soft_targets(["blue"], vocab) == {2: 1.0}


def test_accuracy():
    assert accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])) == 50.0
    with pytest.raises(ValueError, match="shape"):
        accuracy(torch.zeros(2), torch.zeros(3))
