"""The field's metrics: Recall@K for image-text retrieval, VQA accuracy, classification accuracy.

Retrieval follows ALBEF's ``itm_eval``: images have one or more captions; text retrieval (image -> text) counts an
image as hit at K when any of its captions ranks within the top K; image retrieval (text -> image) ranks the one
image of each caption. VQA accuracy is the official min(#annotators who gave the answer / 3, 1), averaged over the
ten leave-one-out subsets of annotators when there are 10 answers, exact match when there is one answer, and
min(count / 3, 1) over all answers otherwise. Answers are normalised (lower case, punctuation, articles, number
words) before they are compared.
"""

from __future__ import annotations

import re
from typing import Dict, List, Sequence

import torch
from torch import Tensor


def retrieval_metrics(sim_i2t: Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> Dict[str, float]:
    """Recall@{1,5,10} both ways and their mean, in percent.

    sim_i2t (n_images, n_texts): higher = more similar. img2txt[i]: indices of image i's captions.
    txt2img[t]: the image of caption t. Returns txt_r1, txt_r5, txt_r10, img_r1, img_r5, img_r10, r_mean.
    """
    n_img, n_txt = sim_i2t.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(
            f"similarity is {n_img}x{n_txt} but there are {len(img2txt)} images and {len(txt2img)} captions"
        )
    sim = sim_i2t.float()
    # rank of each caption for each image (a stable sort: ties rank the lower index first)
    order_t = sim.argsort(dim=1, descending=True, stable=True)
    rank_of = torch.empty_like(order_t)
    rank_of.scatter_(1, order_t, torch.arange(n_txt).expand(n_img, n_txt).contiguous())
    txt_rank = torch.tensor([int(rank_of[i, list(img2txt[i])].min()) for i in range(n_img)])
    order_i = sim.t().argsort(dim=1, descending=True, stable=True)
    target = torch.as_tensor(list(txt2img)).unsqueeze(1)
    img_rank = (order_i == target).float().argmax(dim=1)
    return recall_from_ranks(txt_rank, img_rank)


def recall_from_ranks(txt_rank: Sequence[int], img_rank: Sequence[int]) -> Dict[str, float]:
    """Recall@{1,5,10} in percent from 0-based ranks: ``txt_rank`` of each image query's best caption,
    ``img_rank`` of each caption query's image; their means, r_mean and r_sum."""
    out: Dict[str, float] = {}
    for prefix, ranks in (("txt", txt_rank), ("img", img_rank)):
        r = torch.as_tensor(ranks)
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * float((r < k).float().mean())
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["r_sum"] = sum(out[k] for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"))
    return out


_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~:']")


def normalize_answer(ans: str) -> str:
    """The VQA evaluation's answer normalisation, simplified: lower case, punctuation to spaces (a full stop is
    kept inside numbers), number words to digits, articles removed, whitespace collapsed."""
    a = ans.lower().replace("\n", " ").replace("\t", " ").strip()
    a = _PUNCT.sub(" ", a)
    a = re.sub(r"(?<!\d)\.(?!\d)", " ", a)
    words = [_NUMBERS.get(w, w) for w in a.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (see the module docstring)."""
    if len(answers) == 0:
        raise ValueError("a VQA question needs at least one ground-truth answer to be scored")
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(p == gts[0])
    if len(gts) == 10:
        accs = []
        for i in range(10):
            others = gts[:i] + gts[i + 1 :]
            accs.append(min(sum(g == p for g in others) / 3.0, 1.0))
        return sum(accs) / 10.0
    return min(sum(g == p for g in gts) / 3.0, 1.0)


def vqa_accuracy(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy in percent."""
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} questions")
    if not preds:
        raise ValueError("no predictions to score")
    return 100.0 * sum(vqa_score(p, a) for p, a in zip(preds, answers)) / len(preds)


def soft_targets(answers: Sequence[str], vocab: Dict[str, int]) -> Dict[int, float]:
    """Soft training targets of one question: answer index -> min(count / 3, 1) (one answer -> 1.0).
    Answers outside the vocabulary are ignored."""
    counts: Dict[int, int] = {}
    for a in answers:
        idx = vocab.get(normalize_answer(a))
        if idx is not None:
            counts[idx] = counts.get(idx, 0) + 1
    if len(answers) == 1:
        return {k: 1.0 for k in counts}
    return {k: min(c / 3.0, 1.0) for k, c in counts.items()}


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Classification accuracy in percent."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("no predictions to score")
    return 100.0 * float((pred == target).float().mean())


def build_answer_vocab(answer_lists: List[Sequence[str]], max_answers: int = 3129) -> Dict[str, int]:
    """Answer vocabulary: the ``max_answers`` most frequent normalised answers (ties by first appearance)."""
    counts: Dict[str, int] = {}
    for answers in answer_lists:
        for a in answers:
            n = normalize_answer(a)
            if n:
                counts[n] = counts.get(n, 0) + 1
    ranked = sorted(counts, key=lambda a: -counts[a])[:max_answers]
    return {a: i for i, a in enumerate(ranked)}
