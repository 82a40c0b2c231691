"""Tiny fake copies of the public releases that ``vlprune data prepare`` reads, laid out file for file and field
for field like the real ones (a few images each). ``build(name, root)`` writes one and returns what it holds."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Dict

from PIL import Image


def image(path: Path, fmt: str = "JPEG", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((seed * 37) % 256, (seed * 91) % 256, 120)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def coco_name(folder: str, i: int) -> str:
    return f"COCO_{folder}_{i:012d}.jpg"


def karpathy(root: Path, dataset: str) -> Dict[str, int]:
    splits = ["train", "restval", "val", "test", "train", "test"]
    imgs = []
    for n, split in enumerate(splits):
        cid = 100 + n
        folder = "val2014" if split in ("restval", "val", "test") else "train2014"
        e = {"split": split, "imgid": n, "sentids": [5 * n + j for j in range(5)],
             "sentences": [{"raw": f"A photo number {n} caption {j}.", "tokens": ["a"], "imgid": n, "sentid": 5 * n + j}
                           for j in range(5)]}
        if dataset == "coco":
            e.update(filepath=folder, filename=coco_name(folder, cid), cocoid=cid)
            image(root / folder / e["filename"], seed=n)
        else:
            e.update(filename=f"{1000 + n}.jpg")
            image(root / "flickr30k-images" / e["filename"], seed=n)
        imgs.append(e)
    imgs[0]["sentences"].append(dict(imgs[0]["sentences"][0]))  # a repeated caption: one duplicate
    write(root / f"dataset_{dataset}.json", {"images": imgs, "dataset": dataset})
    # a missing test image
    (root / ("val2014" if dataset == "coco" else "flickr30k-images") / imgs[3]["filename"]).unlink()
    if dataset == "coco":
        (root / "train2014").mkdir(exist_ok=True)
    return {"train": 15, "val": 1, "test": 1, "duplicates": 1, "missing": 1}


def vqav2(root: Path) -> Dict[str, int]:
    counts = {}
    for sub, folder, answers in (("train2014", "train2014", True), ("val2014", "val2014", True),
                                 ("test2015", "test2015", False), ("test-dev2015", "test2015", False)):
        qs = []
        for i in range(3):
            iid = 10 + i
            image(root / folder / coco_name(folder, iid), seed=i)
            qs.append({"image_id": iid, "question": f"what colour is thing {i}?", "question_id": iid * 1000 + i})
        write(root / f"v2_OpenEnded_mscoco_{sub}_questions.json",
              {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": sub,
               "questions": qs})
        if answers:
            write(root / f"v2_mscoco_{sub}_annotations.json", {"info": {}, "data_subtype": sub, "annotations": [
                {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what color",
                 "answer_type": "other", "multiple_choice_answer": ["red", "blue", "red"][i],
                 "answers": [{"answer": ["red", "blue", "red"][i], "answer_confidence": "yes", "answer_id": j + 1}
                             for j in range(10)]} for i, q in enumerate(qs)]})
        counts[sub] = len(qs)
    return counts


def visual_genome(root: Path) -> Dict[str, int]:
    image(root / "VG_100K" / "1.jpg", seed=1)
    image(root / "VG_100K_2" / "2.jpg", seed=2)
    write(root / "image_data.json", [{"image_id": i, "url": f"https://x/{i}.jpg", "width": 8, "height": 8,
                                      "coco_id": None, "flickr_id": None} for i in (1, 2)])
    write(root / "question_answers.json", [
        {"id": 1, "qas": [{"qa_id": 11, "image_id": 1, "question": "What is red?", "answer": "A ball.",
                           "a_objects": [], "q_objects": []},
                          {"qa_id": 12, "image_id": 1, "question": "What colour?", "answer": "Red.",
                           "a_objects": [], "q_objects": []}]},
        {"id": 2, "qas": [{"qa_id": 21, "image_id": 2, "question": "Where?", "answer": "Outside",
                           "a_objects": [], "q_objects": []}]}])
    write(root / "region_descriptions.json", [
        {"id": 1, "regions": [{"region_id": 1, "image_id": 1, "phrase": "a red ball", "x": 0, "y": 0, "width": 4,
                               "height": 4}, {"region_id": 2, "image_id": 1, "phrase": "A red  ball", "x": 1, "y": 1,
                                              "width": 4, "height": 4}]},
        {"id": 2, "regions": [{"region_id": 3, "image_id": 2, "phrase": "green grass", "x": 0, "y": 0, "width": 8,
                               "height": 8}]}])
    return {"qa": 3, "captions": 2}


def nlvr2(root: Path) -> Dict[str, int]:
    for split in ("train", "dev", "test1"):
        rows = []
        for n in range(3):
            ident = f"{split}-{n}-0-{n % 2}"
            row = {"identifier": ident, "sentence": f"There are {n} dogs.", "label": ["True", "False"][n % 2],
                   "writer": "w", "synset": "dog", "query": "dog", "left_url": "u", "right_url": "u",
                   "extra_validations": {}}
            folder = root / "images" / "train" / str(n) if split == "train" else root / split
            if split == "train":
                row["directory"] = str(n)
            for k in (0, 1):
                image(folder / f"{split}-{n}-0-img{k}.png", "PNG", seed=n + k)
            rows.append(row)
        jsonl(root / "data" / f"{split}.json", rows)
    return {"train": 3, "dev": 3, "test1": 3}


def snli_ve(root: Path) -> Dict[str, int]:
    for split in ("train", "dev", "test"):
        rows = []
        for n, label in enumerate(("entailment", "neutral", "contradiction")):
            fid = 3000 + n
            image(root / "flickr30k-images" / f"{fid}.jpg", seed=n)
            rows.append({"Flickr30K_ID": str(fid), "gold_label": label, "sentence1": "A dog runs.",
                         "sentence2": f"An animal {n}.", "pairID": f"{fid}.jpg#0r{n}", "captionID": f"{fid}.jpg#0"})
        jsonl(root / f"snli_ve_{split}.jsonl", rows)
    return {"train": 3, "dev": 3, "test": 3}


def refcoco_plus(root: Path) -> Dict[str, int]:
    refs, anns = [], []
    for n, split in enumerate(("train", "train", "val", "testA", "testB")):
        iid = 500 + n
        image(root / "train2014" / coco_name("train2014", iid), seed=n)
        anns.append({"id": 900 + n, "image_id": iid, "bbox": [1.0, 2.0, 3.0, 4.0], "category_id": 1, "area": 12.0,
                     "iscrowd": 0, "segmentation": []})
        refs.append({"ref_id": n, "ann_id": 900 + n, "image_id": iid, "split": split, "category_id": 1,
                     "file_name": f"COCO_train2014_{iid:012d}_{900 + n}.jpg", "sent_ids": [2 * n, 2 * n + 1],
                     "sentences": [{"raw": f"Left man {n}", "sent": f"left man {n}", "sent_id": 2 * n, "tokens": []},
                                   {"raw": f"Man {n}", "sent": f"man {n}", "sent_id": 2 * n + 1, "tokens": []}]})
    (root / "refcoco+").mkdir(parents=True, exist_ok=True)
    (root / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    write(root / "refcoco+" / "instances.json", {"images": [], "annotations": anns, "categories": []})
    return {"train": 4, "val": 2, "testA": 2, "testB": 2}


def url_list(root: Path, name: str) -> Dict[str, int]:
    """A web caption set with img2dataset's files layout; row 2's image did not download."""
    caps = [f"caption {i} of {name}" for i in range(4)]
    urls = [f"https://example.com/{name}/{i}.jpg" for i in range(4)]
    if name == "cc3m":
        (root / "Train_GCC-training.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in zip(caps, urls)))
    elif name == "cc12m":
        (root / "cc12m.tsv").write_text("".join(f"{u}\t{c}\n" for c, u in zip(caps, urls)))
    else:
        (root / "SBU_captioned_photo_dataset_urls.txt").write_text("\n".join(urls) + "\n")
        (root / "SBU_captioned_photo_dataset_captions.txt").write_text("\n".join(caps) + "\n")
    for i in (0, 1, 3):
        image(root / "images" / "00000" / f"{i:09d}.jpg", seed=i)
    return {"train": 3, "missing": 1}


BUILDERS = {"coco": lambda r: karpathy(r, "coco"), "flickr30k": lambda r: karpathy(r, "flickr30k"),
            "vqav2": vqav2, "vg-qa": visual_genome, "vg-captions": visual_genome, "nlvr2": nlvr2, "snli-ve": snli_ve,
            "refcoco+": refcoco_plus, "cc3m": lambda r: url_list(r, "cc3m"), "cc12m": lambda r: url_list(r, "cc12m"),
            "sbu": lambda r: url_list(r, "sbu")}


def build(name: str, root: Path) -> Dict[str, int]:
    root.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](root)
