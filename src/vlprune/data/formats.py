"""The JSON annotation formats of the field (ALBEF / BLIP / LAVIS), loaded and validated.

Each file is a JSON list of entries; image paths are relative to an image root given separately.

    pretrain         [{"image": path, "caption": str}]
    retrieval train  [{"image": path, "caption": str, "image_id": int | str}]
    retrieval test   [{"image": path, "caption": [str, ...]}]
    vqa              [{"question_id": int | str, "image": path, "question": str, "answer": [str, ...]}]
                     (test files may have no "answer"; a single answer string is accepted and becomes a list)
    answer_list      [str, ...]
    nlvr2            [{"images": [path, path], "sentence": str, "label": "True" | "False"}]
    ve (SNLI-VE)     [{"image": path, "sentence": str, "label": "entailment" | "neutral" | "contradiction"}]

Extra fields are kept (the field's files carry some, e.g. "dataset"); missing or mistyped fields raise a
``ValueError`` naming the file, the entry index and the field. Malformed JSON raises naming the file and the
position. Loaders return plain lists of dicts, so the data stay inspectable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union

from ..fileio import read_json as read_json_file

PathLike = Union[str, Path]

NLVR2_LABELS = ("True", "False")
VE_LABELS = ("entailment", "neutral", "contradiction")
FORMATS = ("pretrain", "retrieval_train", "retrieval_test", "vqa", "nlvr2", "ve")


def read_json(path: PathLike) -> Any:
    """Parse an annotation JSON file; a missing file raises FileNotFoundError, bad JSON a ValueError naming file and
    position."""
    return read_json_file(path, "annotation file")


def _is_nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _is_id(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, str)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_nonempty_str(s) for s in v)


# field -> (check, description of the expected value)
Spec = Dict[str, Tuple[Callable[[Any], bool], str]]

SPECS: Dict[str, Spec] = {
    "pretrain": {"image": (_is_nonempty_str, "an image path"), "caption": (_is_nonempty_str, "a non-empty string")},
    "retrieval_train": {
        "image": (_is_nonempty_str, "an image path"),
        "caption": (_is_nonempty_str, "a non-empty string"),
        "image_id": (_is_id, "an int or string id"),
    },
    "retrieval_test": {
        "image": (_is_nonempty_str, "an image path"),
        "caption": (_is_str_list, "a non-empty list of non-empty strings"),
    },
    "vqa": {
        "question_id": (_is_id, "an int or string id"),
        "image": (_is_nonempty_str, "an image path"),
        "question": (_is_nonempty_str, "a non-empty string"),
    },
    "nlvr2": {
        "images": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_nonempty_str(s) for s in v),
                   "a list of two image paths"),
        "sentence": (_is_nonempty_str, "a non-empty string"),
        "label": (lambda v: v in NLVR2_LABELS, f"one of {list(NLVR2_LABELS)}"),
    },
    "ve": {
        "image": (_is_nonempty_str, "an image path"),
        "sentence": (_is_nonempty_str, "a non-empty string"),
        "label": (lambda v: v in VE_LABELS, f"one of {list(VE_LABELS)}"),
    },
}


def validate(entries: Any, kind: str, where: str = "annotations") -> List[Dict[str, Any]]:
    """Check a parsed annotation list against format ``kind`` (one of FORMATS); returns the entries (VQA answers
    normalised to lists). Raises ValueError naming ``where``, the entry index and the field."""
    if kind not in SPECS:
        raise ValueError(f"unknown annotation format {kind!r}; valid formats: {list(SPECS)}")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected a JSON list of entries, got {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{where}: no entries (empty list)")
    spec = SPECS[kind]
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{where}: entry {i} must be an object, got {type(e).__name__}")
        for name, (check, expected) in spec.items():
            if name not in e:
                raise ValueError(f"{where}: entry {i} has no field {name!r} (format {kind}: needs {sorted(spec)})")
            if not check(e[name]):
                raise ValueError(f"{where}: entry {i} field {name!r} must be {expected}, got {e[name]!r}")
        if kind == "vqa" and "answer" in e:
            ans = [e["answer"]] if isinstance(e["answer"], str) else e["answer"]
            if not _is_str_list(ans):
                raise ValueError(f"{where}: entry {i} field 'answer' must be a non-empty list of strings, got {e['answer']!r}")
            e = {**e, "answer": ans}
        out.append(e)
    return out


def load_annotations(path: PathLike, kind: str) -> List[Dict[str, Any]]:
    """Read and validate one annotation file of format ``kind``."""
    return validate(read_json(path), kind, str(path))


def load_pretrain(path: PathLike) -> List[Dict[str, Any]]:
    return load_annotations(path, "pretrain")


def load_retrieval(path: PathLike, split: str = "train") -> List[Dict[str, Any]]:
    if split not in ("train", "test"):
        raise ValueError(f"retrieval split must be 'train' or 'test', got {split!r}")
    return load_annotations(path, f"retrieval_{split}")


def load_vqa(path: PathLike, require_answer: bool = False) -> List[Dict[str, Any]]:
    entries = load_annotations(path, "vqa")
    if require_answer:
        for i, e in enumerate(entries):
            if "answer" not in e:
                raise ValueError(f"{path}: entry {i} has no field 'answer' (needed for training)")
    return entries


def load_answer_list(path: PathLike) -> List[str]:
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of answer strings")
    for i, a in enumerate(data):
        if not _is_nonempty_str(a):
            raise ValueError(f"{path}: entry {i} must be a non-empty string, got {a!r}")
    if len(set(data)) != len(data):
        raise ValueError(f"{path}: answers must be unique")
    return data


def load_nlvr2(path: PathLike) -> List[Dict[str, Any]]:
    return load_annotations(path, "nlvr2")


def load_ve(path: PathLike) -> List[Dict[str, Any]]:
    return load_annotations(path, "ve")


def write_json(path: PathLike, data: Any) -> None:
    """Write JSON (used by the scenes generator); parent folders are created."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1), encoding="utf-8")
