"""VQAv2 (from the official question and annotation files) and Visual Genome QA (as ALBEF adds it to VQA
training), to ALBEF's VQA files.

VQAv2 files: ``v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json`` (``{"questions":
[{"image_id", "question", "question_id"}], "data_subtype", ...}``) and
``v2_mscoco_{train2014,val2014}_annotations.json`` (``{"annotations": [{"question_id", "image_id", "answers": [{"answer", "answer_confidence", "answer_id"}] x 10,
"multiple_choice_answer", ...}]}``); images ``train2014/``, ``val2014/``, ``test2015/`` (COCO's
``COCO_{subtype}_{image_id:012d}.jpg``).

Output: ``train.json`` / ``val.json`` (``question_id``, ``question``, ``answer`` = the 10 annotator answers,
``image``, ``dataset``: "vqa"), ``test.json`` / ``test-dev.json`` (no answers: results go to the evaluation
server) and ``answer_list.json``: the ``answers`` most frequent ``multiple_choice_answer`` of train + val (3,128 by
default, the size of ALBEF's list; ours is recomputed from the release, ties broken alphabetically).

Visual Genome: ``question_answers.json`` (``[{"id": image_id, "qas": [{"qa_id", "image_id", "question", "answer",
...}]}]``) and ``image_data.json``, images in ``VG_100K/`` and ``VG_100K_2/``. Answers are normalised (lower case,
no final period); with ``answer_list`` (a file) only QAs whose answer is in it are kept, as ALBEF does.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

from .common import LayoutError, Split, Target, load_release_json, require_fields, write_json_atomic

Q = "v2_OpenEnded_mscoco_{}_questions.json"
A = "v2_mscoco_{}_annotations.json"
FOLDER = {"train2014": "train2014", "val2014": "val2014", "test2015": "test2015", "test-dev2015": "test2015"}
DEFAULT_ANSWERS = 3128


@lru_cache(maxsize=8)
def _load(path: str, mtime: int, key: str) -> List[Dict[str, Any]]:
    data = load_release_json(Path(path), "vqav2")
    if not isinstance(data, dict) or key not in data:
        raise LayoutError(f"vqav2: {path} is not a VQAv2 {key} file (no {key!r} list)")
    require_fields(data[key], ("question_id", "image_id"), path, "vqav2")
    return data[key]


def _read(root: Path, name: str, key: str) -> List[Dict[str, Any]]:
    p = root / name
    return _load(str(p), p.stat().st_mtime_ns, key)


def coco_image(subtype: str, image_id: int) -> str:
    folder = FOLDER[subtype]
    return f"{folder}/COCO_{folder}_{int(image_id):012d}.jpg"


def vqa_split(subtype: str, answers: bool):
    def run(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
        qs = _read(root, Q.format(subtype), "questions")
        ann = {a["question_id"]: a for a in _read(root, A.format(subtype), "annotations")} if answers else {}
        out = []
        for q in qs:
            e = {"question_id": q["question_id"], "question": q["question"],
                 "image": coco_image(subtype, q["image_id"]), "dataset": "vqa"}
            if answers:
                a = ann.get(q["question_id"])
                if a is None:
                    raise LayoutError(f"vqav2: question {q['question_id']} of {Q.format(subtype)} has no annotation "
                                      f"in {A.format(subtype)} (files from different releases?)")
                e["answer"] = [x["answer"] for x in a["answers"]]
            out.append(e)
        return out
    return run


def answer_list(root: Path, n: int) -> List[str]:
    """The ``n`` most frequent ``multiple_choice_answer`` over train + val (ties alphabetical)."""
    counts: Counter = Counter()
    for sub in ("train2014", "val2014"):
        counts.update(a["multiple_choice_answer"] for a in _read(root, A.format(sub), "annotations"))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:n]]


def write_answer_list(root: Path, out: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    n = int(options.get("answers", DEFAULT_ANSWERS))
    if n < 1:
        raise ValueError(f"--answers must be >= 1, got {n}")
    answers = answer_list(root, n)
    write_json_atomic(out / "answer_list.json", answers)
    return {"answer_list": f"{len(answers)} answers -> {out / 'answer_list.json'}"}


def sniff_vqa(root: Path) -> None:
    data = load_release_json(root / Q.format("train2014"), "vqav2")
    sub = data.get("data_subtype") if isinstance(data, dict) else None
    if sub not in (None, "train2014"):
        raise LayoutError(f"vqav2: {root / Q.format('train2014')} says data_subtype {sub!r}, not 'train2014'")


# published counts: questions (entries) and images per split
VQAV2 = Target(
    "vqav2", "VQAv2",
    tuple([Q.format(s) for s in FOLDER] + [A.format(s) for s in ("train2014", "val2014")]
          + ["train2014", "val2014", "test2015"]),
    (Split("train", vqa_split("train2014", True), "vqa", (443_757, 82_783),
           sources=(Q.format("train2014"), A.format("train2014"))),
     Split("val", vqa_split("val2014", True), "vqa", (214_354, 40_504),
           sources=(Q.format("val2014"), A.format("val2014"))),
     Split("test", vqa_split("test2015", False), "vqa", (447_793, 81_434), sources=(Q.format("test2015"),)),
     Split("test-dev", vqa_split("test-dev2015", False), "vqa", (107_394, 36_807),
           sources=(Q.format("test-dev2015"),))),
    sniff=sniff_vqa, options={"answers": DEFAULT_ANSWERS}, finish=write_answer_list,
    layout="ROOT/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json, "
           "ROOT/v2_mscoco_{train2014,val2014}_annotations.json, ROOT/{train2014,val2014,test2015}/COCO_*.jpg",
)


def normalise_answer(a: str) -> str:
    a = a.strip().lower()
    return a[:-1].strip() if a.endswith(".") else a


def vg_image(root: Path, image_id: int) -> str:
    for folder in ("VG_100K", "VG_100K_2"):
        if (root / folder / f"{image_id}.jpg").is_file():
            return f"{folder}/{image_id}.jpg"
    return f"VG_100K/{image_id}.jpg"  # missing: reported by the image check


def vg_qa(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
    data = load_release_json(root / "question_answers.json", "vg-qa")
    if not isinstance(data, list):
        raise LayoutError("vg-qa: question_answers.json must be a list of {'id', 'qas'} (Visual Genome 1.2)")
    require_fields(data, ("id", "qas"), "question_answers.json", "vg-qa")
    keep: Optional[set] = None
    if options.get("answer_list"):
        keep = set(load_release_json(Path(options["answer_list"]), "vg-qa"))
    out = []
    for img in data:
        if not img["qas"]:
            continue
        path = vg_image(root, img["id"])
        for qa in img["qas"]:
            a = normalise_answer(qa["answer"])
            if a and (keep is None or a in keep):
                out.append({"question_id": f"vg_{qa['qa_id']}", "question": qa["question"].strip(), "answer": [a],
                            "image": path, "dataset": "vg"})
    return out


VG_QA = Target(
    "vg-qa", "Visual Genome 1.2 question answers", ("question_answers.json", "image_data.json", "VG_100K"),
    (Split("train", vg_qa, "vqa", (1_445_322, None)),),
    layout="ROOT/question_answers.json, ROOT/image_data.json, ROOT/VG_100K/*.jpg, ROOT/VG_100K_2/*.jpg",
    options={"answer_list": None},
)
