"""BERT-style WordPiece tokenizer (Hugging Face ``tokenizers``): a checkpoint's own, or one trained on the text.

Special tokens: [PAD] [UNK] [CLS] [SEP] [MASK]. A trained vocabulary puts them first, so [PAD] = 0, matching
``TextConfig.pad_token_id = 0``; a checkpoint's vocabulary is taken as it is (BERT's has [PAD] = 0 too) and
``check_model`` raises when its pad id or size does not fit the model.

Text cleaning (``cleaning="albef"``, turned on by the official ALBEF / ELIP loaders and saved with the tokenizer
as ``text_cleaning.json``): every caption or question is cleaned as ALBEF's data pipeline cleans it before
encoding: lower case; the characters , . ' ! ? " ( ) * # : ; ~ removed; - and / turned into spaces; "<person>"
into "person"; runs of spaces collapsed; at most 30 words; and at most 30 tokens (incl. [CLS] and [SEP]).

Encoding: ``[CLS] tokens [SEP]`` padded to the longest caption of the batch. Empty or whitespace-only captions
raise ValueError naming their index. Captions longer than ``max_len`` tokens (incl. [CLS] and [SEP]) are
*truncated* (keeping the final [SEP]) and a warning is logged with how many were cut: long captions are common in
real data and raising would stop a training run for one of them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"
CLEANING_FILE = "text_cleaning.json"
# cleaning name -> (max words, max tokens incl. [CLS] and [SEP]); "none": the text as it is
CLEANINGS = {"none": (None, None), "albef": (30, 30)}
_ALBEF_DROP = re.compile(r"[,.'!?\"()*#:;~]")


def clean_albef(text: str, max_words: int = 30) -> str:
    """A caption as ALBEF's pipeline feeds it to BERT: lower case, its punctuation set dropped, - and / as spaces,
    <person> as person, single spaces, the first ``max_words`` words."""
    t = _ALBEF_DROP.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    return " ".join(t.split()[:max_words])


def check_cleaning(name: str) -> str:
    if name not in CLEANINGS:
        raise ValueError(f"text cleaning must be one of {list(CLEANINGS)}, got {name!r}")
    return name


def _pipeline(tok, lowercase: bool):
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


class TextTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with BERT's special tokens; ``encode`` gives (ids, mask) tensors."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.tok.no_padding()
        self.tok.no_truncation()
        missing = [s for s in SPECIALS if tokenizer.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks special token(s) {missing}; needed: {list(SPECIALS)}")
        tokenizer.add_special_tokens(list(SPECIALS))  # already in the vocabulary: marks them, adds no ids
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (tokenizer.token_to_id(s) for s in SPECIALS)
        self.cleaning = "none"

    def with_cleaning(self, name: str) -> "TextTokenizer":
        """This tokenizer with text cleaning ``name`` (see CLEANINGS); returns self."""
        self.cleaning = check_cleaning(name)
        return self

    def clean(self, text: str) -> str:
        words = CLEANINGS[self.cleaning][0]
        return text if words is None else clean_albef(text, words)

    # -- construction ------------------------------------------------------------------------------------------
    @staticmethod
    def train(texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> "TextTokenizer":
        """Build a WordPiece vocabulary of at most ``vocab_size`` entries from ``texts``, deterministically.

        Order: the specials, every character (word-initial, then ``##`` continuation) by frequency, then whole
        words by frequency (ties alphabetical) until the size is reached; a word outside the vocabulary falls back
        to its characters. (``tokenizers``' own WordPieceTrainer is not used: its vocabulary varies from run to
        run, which would break resuming and multi-process training.)
        """
        from collections import Counter

        from tokenizers import Tokenizer, models

        if vocab_size < len(SPECIALS) + 1:
            raise ValueError(f"vocab_size must be >= {len(SPECIALS) + 1}, got {vocab_size}")
        probe = _pipeline(Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")), lowercase)
        words: Counter = Counter()
        for t in texts:
            norm = probe.normalizer.normalize_str(t)
            words.update(w for w, _ in probe.pre_tokenizer.pre_tokenize_str(norm))
        first, cont = Counter(), Counter()
        for w, n in words.items():
            first[w[0]] += n
            for c in w[1:]:
                cont["##" + c] += n
        by_freq = lambda c: sorted(c, key=lambda k: (-c[k], k))  # noqa: E731
        vocab = list(SPECIALS)
        for tok in by_freq(first) + by_freq(cont) + by_freq(words):
            if len(vocab) >= vocab_size:
                break
            if tok not in vocab:
                vocab.append(tok)
        table = {w: i for i, w in enumerate(vocab)}
        return TextTokenizer(_pipeline(Tokenizer(models.WordPiece(table, unk_token="[UNK]", max_input_chars_per_word=100)), lowercase))

    @staticmethod
    def from_dir(directory: Union[str, Path]) -> "TextTokenizer":
        """Load ``tokenizer.json`` or, failing that, a BERT ``vocab.txt`` (lower-casing from tokenizer_config.json's
        ``do_lower_case``, default True) from a local directory (a run directory or a BERT checkpoint), with the
        text cleaning its ``text_cleaning.json`` names (none without one)."""
        d = Path(directory)
        cleaning = "none"
        if (d / CLEANING_FILE).is_file():
            from ..fileio import read_json

            cleaning = check_cleaning((read_json(d / CLEANING_FILE) or {}).get("cleaning", "none"))
        return TextTokenizer._from_dir(d).with_cleaning(cleaning)

    @staticmethod
    def _from_dir(d: Path) -> "TextTokenizer":
        from tokenizers import Tokenizer, models

        if (d / TOKENIZER_FILE).is_file():
            try:
                return TextTokenizer(Tokenizer.from_file(str(d / TOKENIZER_FILE)))
            except Exception as e:  # tokenizers raises its own exception type
                raise ValueError(f"cannot read {d / TOKENIZER_FILE}: {e}") from None
        vocab = d / "vocab.txt"
        if not vocab.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} or vocab.txt in {d}")
        lower = True
        cfg = d / "tokenizer_config.json"
        if cfg.is_file():
            lower = bool(json.loads(cfg.read_text()).get("do_lower_case", True))
        words = vocab.read_text(encoding="utf-8").splitlines()
        table = {w: i for i, w in enumerate(words) if w}
        tok = Tokenizer(models.WordPiece(vocab=table, unk_token="[UNK]", max_input_chars_per_word=100))
        return TextTokenizer(_pipeline(tok, lower))

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``tokenizer.json`` and ``vocab.txt`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / TOKENIZER_FILE))
        vocab = sorted(self.tok.get_vocab().items(), key=lambda kv: kv[1])
        (d / "vocab.txt").write_text("\n".join(w for w, _ in vocab) + "\n", encoding="utf-8")
        if self.cleaning != "none":
            (d / CLEANING_FILE).write_text(json.dumps({"cleaning": self.cleaning}) + "\n", encoding="utf-8")
        return d / TOKENIZER_FILE

    # -- use ---------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def special_ids(self) -> Tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    def check_model(self, text_cfg) -> None:
        """Raise when the vocabulary does not fit a TextConfig (size or pad id)."""
        if self.vocab_size > text_cfg.vocab_size:
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens but the model's text.vocab_size is {text_cfg.vocab_size}"
            )
        if self.pad_id != text_cfg.pad_token_id:
            raise ValueError(f"tokenizer [PAD] id {self.pad_id} != the model's text.pad_token_id {text_cfg.pad_token_id}")

    def tokenize(self, text: str) -> List[str]:
        return self.tok.encode(text, add_special_tokens=False).tokens

    def encode(self, captions: Sequence[str], max_len: int) -> Tuple[Tensor, Tensor]:
        """Captions -> ids (B, L) long and mask (B, L) long (1 = real token), L = longest caption (<= max_len)."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, got a single string")
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 ([CLS] word [SEP]), got {max_len}")
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"caption {i} is empty or whitespace: {c!r}")
        if len(captions) == 0:
            raise ValueError("no captions to encode (batch size 0)")
        limit = CLEANINGS[self.cleaning][1]
        if limit is not None:
            captions, max_len = [self.clean(c) for c in captions], min(max_len, limit)
        pieces = [e.ids for e in self.tok.encode_batch(list(captions), add_special_tokens=False)]
        body = max_len - 2
        cut = sum(len(p) > body for p in pieces)
        if cut:
            log.warning("%d of %d caption(s) longer than %d tokens were truncated", cut, len(pieces), max_len)
        rows = [[self.cls_id] + p[:body] + [self.sep_id] for p in pieces]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):  # building the batch from python lists, once per batch
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)
