"""Open-ended VQA answers scored as the VQAv2 evaluation does (the official evaluator, GT-Vision-Lab/VQA).

Normalisation of an answer (``normalize_vqa_answer``):
1. newlines and tabs become spaces, the ends are stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space or
   the answer has a comma between two digits ("1,000"), and becomes a space otherwise; then every full stop not
   followed by a digit is deleted ("3.5" keeps its point);
3. lower case, split on whitespace; number words "none", "zero" ... "ten" become digits; the articles "a", "an",
   "the" are dropped; contractions written without their apostrophes get them back ("dont" -> "don't",
   "couldnt've" -> "couldn't've"); joined by single spaces.
The official evaluator normalises only when the annotators disagree; here the prediction and every ground-truth
answer are always normalised (a generated "Yes." must match "yes"; VQAv2's unanimous answers are already in this
form), as the answer processor of the evaluation server does to a submission.

Accuracy of one prediction (``vqa_answer_accuracy``): for each of the n ground-truth answers, leave it out and
score min(#others equal to the prediction / 3, 1); the mean over the n subsets (VQAv2: the 10 choose 9 subsets).
A question with a single ground-truth answer (not VQAv2) is scored by exact match.
"""

from __future__ import annotations

import re
from itertools import combinations
from statistics import fmean
from typing import Dict, Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
# the contractions in their written form; every spelling with some of the apostrophes missing maps to it
CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've").split()
_DIGIT_COMMA = re.compile(r"\d,\d")
_FULL_STOP = re.compile(r"\.(?!\d)")


def _spellings(word: str) -> Sequence[str]:
    """Every spelling of ``word`` with a non-empty subset of its apostrophes removed."""
    parts = word.split("'")
    out = []
    for r in range(1, len(parts)):
        for drop in combinations(range(len(parts) - 1), r):
            s = parts[0]
            for i, p in enumerate(parts[1:]):
                s += ("" if i in drop else "'") + p
            out.append(s)
    return out


CONTRACTIONS: Dict[str, str] = {s: w for w in CONTRACTED for s in _spellings(w) if s not in CONTRACTED}


def strip_punctuation(text: str) -> str:
    """Step 2: the evaluator's punctuation rule (see the module docstring)."""
    glued = bool(_DIGIT_COMMA.search(text))
    for p in PUNCTUATION:
        touches = (p + " ") in text or (" " + p) in text
        text = text.replace(p, "" if touches or glued else " ")
    return _FULL_STOP.sub("", text)


def words_digits_articles(text: str) -> str:
    """Step 3: lower case, number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """An answer in the VQAv2 evaluator's normal form."""
    if not isinstance(answer, str):
        raise TypeError(f"a VQA answer must be a str, got {type(answer).__name__}: {answer!r}")
    return words_digits_articles(strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_answer_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one prediction against the annotators' answers (leave-one-out mean of
    min(matches / 3, 1); exact match for a single answer)."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"a VQA question needs a non-empty list of ground-truth answers, got {answers!r}")
    p = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(p == gts[0])
    same = sum(g == p for g in gts)
    return sum(min((same - (g == p)) / 3.0, 1.0) for g in gts) / len(gts)


def vqa_open_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy in percent over questions (one prediction and one answer list each, at least one)."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions: need one per question")
    return 100.0 * fmean(map(vqa_answer_accuracy, predictions, answers))


__all__ = ["normalize_vqa_answer", "vqa_answer_accuracy", "vqa_open_accuracy", "strip_punctuation",
           "words_digits_articles", "CONTRACTIONS"]
