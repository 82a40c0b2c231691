"""COCO and Flickr30k captions in Karpathy's split, from ``dataset_coco.json`` / ``dataset_flickr30k.json``
(``caption_datasets.zip``), to ALBEF's retrieval (and captioning) files.

Karpathy's file: ``{"dataset": "coco" | "flickr30k", "images": [{"filepath" (COCO only: "train2014" |
"val2014"), "filename", "split": "train" | "restval" | "val" | "test", "sentences": [{"raw", "tokens", ...}],
"cocoid" (COCO) , "imgid", ...}]}``. ``restval`` joins ``train``, as in ALBEF and BLIP.

Output: ``train.json`` (retrieval train: one entry per caption, ``image_id`` = the image's id) and ``val.json`` /
``test.json`` (retrieval test: one entry per image with all its captions). Image paths are relative to the root:
COCO ``train2014/COCO_train2014_....jpg``, Flickr30k ``flickr30k-images/NNN.jpg``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

from .common import LayoutError, Split, Target, load_release_json, require_fields

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@lru_cache(maxsize=4)
def _images(path: str, mtime: int, dataset: str) -> List[Dict[str, Any]]:
    data = load_release_json(Path(path), dataset)
    if not isinstance(data, dict) or "images" not in data:
        raise LayoutError(f"{dataset}: {path} is not a Karpathy split file (no 'images' list)")
    if data.get("dataset") != dataset:
        raise LayoutError(f"{dataset}: {path} is Karpathy's {data.get('dataset')!r} file, not {dataset!r}")
    require_fields(data["images"], ("filename", "split", "sentences"), path, dataset)
    return data["images"]


def karpathy_images(root: Path, dataset: str) -> List[Dict[str, Any]]:
    p = root / f"dataset_{dataset}.json"
    return _images(str(p), p.stat().st_mtime_ns, dataset)


def image_path(img: Dict[str, Any], dataset: str) -> str:
    if dataset == "coco":
        return f"{img['filepath']}/{img['filename']}"
    return f"flickr30k-images/{img['filename']}"


def image_id(img: Dict[str, Any], dataset: str) -> str:
    return f"coco_{img['cocoid']}" if dataset == "coco" else img["filename"].rsplit(".", 1)[0]


def captions(img: Dict[str, Any]) -> List[str]:
    return [s["raw"].strip() for s in img["sentences"] if s.get("raw", "").strip()]


def build(dataset: str, split: str):
    def run(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
        imgs = [i for i in karpathy_images(root, dataset) if i["split"] in KARPATHY_SPLITS[split]]
        if not imgs:
            raise LayoutError(f"{dataset}: dataset_{dataset}.json has no image in Karpathy split {split!r}")
        if split == "train":
            return [{"image": image_path(i, dataset), "caption": c, "image_id": image_id(i, dataset)}
                    for i in imgs for c in captions(i)]
        return [{"image": image_path(i, dataset), "caption": captions(i)} for i in imgs]
    return run


def _split(dataset: str, name: str, expected) -> Split:
    return Split(name, build(dataset, name), "retrieval_train" if name == "train" else "retrieval_test", expected)


# (entries, images) of the full release: COCO 113,287 train (+restval) / 5,000 / 5,000 images with 566,747 /
# 25,010 / 25,010 captions; Flickr30k 29,000 / 1,014 / 1,000 images with 5 captions each (published counts)
COCO = Target(
    "coco", "COCO 2014 with Karpathy's split", ("dataset_coco.json", "train2014", "val2014"),
    (_split("coco", "train", (566_747, 113_287)), _split("coco", "val", (5_000, 5_000)),
     _split("coco", "test", (5_000, 5_000))),
    layout="ROOT/dataset_coco.json, ROOT/train2014/COCO_train2014_*.jpg, ROOT/val2014/COCO_val2014_*.jpg",
)
FLICKR30K = Target(
    "flickr30k", "Flickr30k with Karpathy's split", ("dataset_flickr30k.json", "flickr30k-images"),
    (_split("flickr30k", "train", (145_000, 29_000)), _split("flickr30k", "val", (1_014, 1_014)),
     _split("flickr30k", "test", (1_000, 1_000))),
    layout="ROOT/dataset_flickr30k.json, ROOT/flickr30k-images/*.jpg",
)
