"""NLVR2 and SNLI-VE, from the JSON-lines files of their GitHub releases, to ALBEF's files.

NLVR2 (``lil-lab/nlvr``, ``nlvr2/data/``): ``train.json``, ``dev.json``, ``test1.json``, one object per line with
``identifier`` ("train-10171-0-0": split, set, pair, sentence), ``sentence``, ``label`` ("True" / "False") and,
for train, ``directory`` (the sub-folder of its images). The images (distributed separately) are
``images/train/DIR/ID-img0.png`` and ``ID-img1.png`` for train, ``dev/ID-img0.png`` and ``test1/ID-img0.png``
otherwise, where ID is the identifier without its last part.

SNLI-VE (``necla-ml/SNLI-VE``): ``snli_ve_{train,dev,test}.jsonl`` with ``Flickr30K_ID``, ``sentence2`` (the
hypothesis) and ``gold_label``; the images are Flickr30k's ``flickr30k-images/ID.jpg``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List

from ..data.formats import NLVR2_LABELS, VE_LABELS
from .common import Split, Target, load_jsonl, require_fields

log = logging.getLogger(__name__)


def nlvr2_images(row: Dict[str, Any], split: str) -> List[str]:
    stem = row["identifier"].rsplit("-", 1)[0]
    folder = f"images/train/{row['directory']}" if split == "train" else split
    return [f"{folder}/{stem}-img0.png", f"{folder}/{stem}-img1.png"]


def nlvr2_split(split: str):
    def run(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
        rows = load_jsonl(root / "data" / f"{split}.json", "nlvr2")
        require_fields(rows, ("identifier", "sentence", "label") + (("directory",) if split == "train" else ()),
                       f"data/{split}.json", "nlvr2")
        out = [{"images": nlvr2_images(r, split), "sentence": r["sentence"].strip(), "label": str(r["label"]),
                "identifier": r["identifier"]} for r in rows]
        bad = [e for e in out if e["label"] not in NLVR2_LABELS]
        if bad:
            raise ValueError(f"nlvr2: data/{split}.json: label {bad[0]['label']!r} of {bad[0]['identifier']} is not "
                             f"one of {list(NLVR2_LABELS)}")
        return out
    return run


NLVR2 = Target(
    "nlvr2", "NLVR2", ("data/train.json", "data/dev.json", "data/test1.json", "images/train", "dev", "test1"),
    (Split("train", nlvr2_split("train"), "nlvr2", (86_373, None), "images", ("data/train.json",)),
     Split("dev", nlvr2_split("dev"), "nlvr2", (6_982, None), "images", ("data/dev.json",)),
     Split("test1", nlvr2_split("test1"), "nlvr2", (6_967, None), "images", ("data/test1.json",))),
    layout="ROOT/data/{train,dev,test1}.json, ROOT/images/train/DIR/*.png, ROOT/dev/*.png, ROOT/test1/*.png",
)


def ve_split(split: str):
    def run(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
        name = f"snli_ve_{split}.jsonl"
        rows = load_jsonl(root / name, "snli-ve")
        require_fields(rows, ("Flickr30K_ID", "sentence2", "gold_label"), name, "snli-ve")
        out = [{"image": f"flickr30k-images/{r['Flickr30K_ID']}.jpg", "sentence": r["sentence2"].strip(),
                "label": r["gold_label"], "pair_id": r.get("pairID")} for r in rows]
        kept = [e for e in out if e["label"] in VE_LABELS]
        if len(kept) < len(out):
            log.warning("snli-ve %s: %d entries without a gold label left out", split, len(out) - len(kept))
        return kept
    return run


SNLI_VE = Target(
    "snli-ve", "SNLI-VE", ("snli_ve_train.jsonl", "snli_ve_dev.jsonl", "snli_ve_test.jsonl", "flickr30k-images"),
    (Split("train", ve_split("train"), "ve", (529_527, 29_783), sources=("snli_ve_train.jsonl",)),
     Split("dev", ve_split("dev"), "ve", (17_858, 1_000), sources=("snli_ve_dev.jsonl",)),
     Split("test", ve_split("test"), "ve", (17_901, 1_000), sources=("snli_ve_test.jsonl",))),
    layout="ROOT/snli_ve_{train,dev,test}.jsonl, ROOT/flickr30k-images/*.jpg",
)
