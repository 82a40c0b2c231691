"""Captioning files as BLIP ships them (COCO Karpathy split), and the COCO-format references and results.

    train       [{"image": path, "caption": str, "image_id": str | int}]       (coco_karpathy_train.json)
    val / test  [{"image": path, "caption": [str, ...]}]                       (coco_karpathy_{val,test}.json)
    references  {"images": [{"id": int}, ...], "annotations": [{"image_id": int, "caption": str, "id": int}, ...]}
                (coco_karpathy_{val,test}_gt.json, COCO caption format)
    results     [{"image_id": int, "caption": str}, ...]                       (what ``eval caption`` writes)

An image's id is the trailing number of its file name, as BLIP's evaluation takes it
(``val2014/COCO_val2014_000000391895.jpg`` -> 391895; the scenes' ``images/000012.png`` -> 12); an entry may carry
an explicit integer ``image_id`` instead. Captions are cleaned as BLIP's ``pre_caption`` does (``pre_caption``).
Bad entries raise a ValueError naming the file and the entry.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

from .formats import read_json, validate

PathLike = Union[str, Path]
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """BLIP's caption cleaning: lower case, ``.!"()*#:;~`` to spaces, runs of spaces collapsed, trailing newline and
    spaces stripped, at most ``max_words`` words."""
    c = _PUNCT.sub(" ", caption.lower())
    c = _SPACES.sub(" ", c).rstrip("\n").strip(" ")
    words = c.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else c


def image_id_of(entry: Dict[str, Any], where: str, index: int) -> int:
    """An entry's integer image id: an int ``image_id``, else the trailing number of its image file name."""
    iid = entry.get("image_id")
    if isinstance(iid, int) and not isinstance(iid, bool):
        return iid
    m = re.search(r"(\d+)\D*$", Path(str(entry.get("image", ""))).stem)
    if m is None:
        raise ValueError(f"{where}: entry {index} has no integer image_id and its image name {entry.get('image')!r} "
                         "ends in no number (BLIP takes the id from the file name)")
    return int(m.group(1))


def load_caption_train(path: PathLike) -> List[Dict[str, Any]]:
    """Training entries (one caption each) with an integer ``image_index`` per distinct image."""
    entries = validate(read_json(path), "retrieval_train", str(path))
    return entries


def load_caption_test(path: PathLike) -> List[Dict[str, Any]]:
    """Evaluation entries (a list of reference captions each), each with its integer ``image_id``; two entries
    with the same image id raise."""
    entries = validate(read_json(path), "retrieval_test", str(path))
    seen: Dict[int, int] = {}
    out = []
    for i, e in enumerate(entries):
        iid = image_id_of(e, str(path), i)
        if iid in seen:
            raise ValueError(f"{path}: entries {seen[iid]} and {i} have the same image id {iid}")
        seen[iid] = i
        out.append({**e, "image_id": iid})
    return out


def coco_references(entries: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The COCO-format reference JSON of evaluation entries (what ``coco_karpathy_test_gt.json`` holds)."""
    images, anns = [], []
    for e in entries:
        images.append({"id": e["image_id"]})
        for c in e["caption"]:
            anns.append({"image_id": e["image_id"], "caption": c, "id": len(anns)})
    return {"info": {"description": "vlprune caption references"}, "licenses": [], "type": "captions",
            "images": images, "annotations": anns}


def load_references(path: PathLike, image_ids: Sequence[int]) -> Dict[int, List[str]]:
    """{image_id: [reference captions]} from a COCO-format reference JSON, for exactly ``image_ids``: an image of
    the evaluated split without a reference raises (a reference file of another split), naming the file."""
    data = read_json(path)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list) or not anns:
        raise ValueError(f"{path}: expected a COCO caption JSON with a non-empty 'annotations' list")
    refs: Dict[int, List[str]] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str) or not a["caption"].strip():
            raise ValueError(f"{path}: annotation {i} needs an 'image_id' and a non-empty 'caption', got {a!r}")
        refs.setdefault(int(a["image_id"]), []).append(a["caption"])
    missing = [i for i in image_ids if i not in refs]
    if missing:
        raise ValueError(f"{path}: no reference caption for {len(missing)} of the {len(image_ids)} evaluated images "
                         f"(first: image_id {missing[0]}); is it the reference file of another split?")
    return {i: refs[i] for i in image_ids}
