"""Caption metrics as the field computes them: pycocoevalcap's BLEU-1..4, ROUGE-L and CIDEr (its CIDEr is CIDEr-D),
plus METEOR when Java is present and asked for. Scores are reported x100 (``Bleu_4``, ``CIDEr``, ``ROUGE_L``).

Tokenisation: pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP, run through Java) when ``java`` is on the PATH;
otherwise ``python_tokenize``, a Python rendering of what it does on plain English captions: lower case, split
off punctuation and the possessive / contraction suffixes ('s, n't, 're, ...), keep decimal numbers whole, write
brackets as PTB's escapes (-lrb- ...; they survive, as in pycocoevalcap), then drop the punctuation tokens the PTB
tokenizer removes. On captions made of words, spaces and that punctuation the two give the same tokens
(tested); on unusual text (URLs, numbers with dots, abbreviations) CoreNLP's rules are richer and scores may differ
slightly, so every report names the tokenizer it used. SPICE is not run (it downloads Stanford models).
"""

from __future__ import annotations

import logging
import re
import shutil
from typing import Dict, List, Mapping, Sequence, Tuple

log = logging.getLogger(__name__)

# the punctuation tokens pycocoevalcap's PTBTokenizer removes after tokenising
PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";")
_SUFFIX = re.compile(r"(?i)(\w)('s|'m|'d|'ll|'re|'ve|n't)\b")
_SPLIT = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:[-']\w+)*|'s|'m|'d|'ll|'re|'ve|n't|\.\.\.|--|[^\w\s]")
# brackets become PTB escapes, which the tokenizer lower-cases and so no longer matches in PUNCTUATIONS: they stay
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def have_java() -> bool:
    return shutil.which("java") is not None


def python_tokenize(caption: str) -> str:
    """One caption -> its space-joined lower-case tokens without punctuation (see the module docstring)."""
    text = caption.lower().replace("\n", " ")
    text = _SUFFIX.sub(r"\1 \2", text)
    toks = []
    for t in _SPLIT.findall(text):
        if t in PUNCTUATIONS or t == '"':
            continue
        toks.append(_BRACKETS.get(t, t))
    return " ".join(toks)


def tokenize(captions: Mapping[int, Sequence[str]], tokenizer: str = "auto") -> Tuple[Dict[int, List[str]], str]:
    """({id: [tokenised captions]}, the tokenizer used: "ptb" or "python"). ``tokenizer``: auto (ptb when Java is
    present), ptb, python."""
    if tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"tokenizer must be auto, ptb or python, got {tokenizer!r}")
    use = "ptb" if tokenizer == "ptb" or (tokenizer == "auto" and have_java()) else "python"
    if use == "ptb":
        if not have_java():
            raise RuntimeError("the PTB tokenizer needs Java (no 'java' on the PATH); use tokenizer='python'")
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        data = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        return PTBTokenizer().tokenize(data), use
    return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}, use


def caption_scores(results: Mapping[int, str], references: Mapping[int, Sequence[str]], tokenizer: str = "auto",
                   meteor: bool = False) -> Tuple[Dict[str, float], Dict[str, List[float]], str]:
    """(corpus scores x100, per-image scores x100 (CIDEr, Bleu_4, ROUGE_L), tokenizer used) of one caption per
    image against its references. Every result image needs references and vice versa; an empty caption list
    raises."""
    if not results:
        raise ValueError("no captions to score (empty result list)")
    missing = [i for i in results if i not in references]
    if missing:
        raise ValueError(f"no reference captions for image_id {missing[0]} ({len(missing)} result(s) without)")
    extra = [i for i in references if i not in results]
    if extra:
        raise ValueError(f"no generated caption for image_id {extra[0]} ({len(extra)} reference image(s) without)")
    for i, refs in references.items():
        if not refs:
            raise ValueError(f"image_id {i} has an empty reference caption list")
    ids = list(results)
    gts, used = tokenize({i: list(references[i]) for i in ids}, tokenizer)
    res, _ = tokenize({i: [results[i]] for i in ids}, used)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: Dict[str, float] = {}
    per: Dict[str, List[float]] = {}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its ratio line
        b, b_per = Bleu(4).compute_score(gts, res)
    for n in range(4):
        scores[f"Bleu_{n + 1}"] = 100 * float(b[n])
    per["Bleu_4"] = [100 * float(x) for x in b_per[3]]
    r, r_per = Rouge().compute_score(gts, res)
    scores["ROUGE_L"], per["ROUGE_L"] = 100 * float(r), [100 * float(x) for x in r_per]
    c, c_per = Cider().compute_score(gts, res)
    scores["CIDEr"], per["CIDEr"] = 100 * float(c), [100 * float(x) for x in c_per]
    if meteor:
        if not have_java():
            log.warning("METEOR skipped: it needs Java")
        else:
            from pycocoevalcap.meteor.meteor import Meteor

            m, _ = Meteor().compute_score(gts, res)
            scores["METEOR"] = 100 * float(m)
    return scores, per, used


__all__ = ["caption_scores", "python_tokenize", "tokenize", "have_java", "PUNCTUATIONS"]
