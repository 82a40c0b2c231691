"""The pre-training caption sets (CC3M, CC12M, SBU, Visual Genome region captions; COCO through ``coco``) to the
pre-training format, then to tar shards + manifest, and the 4M / 14M mixtures of ALBEF.

The web sets are published as lists of image URLs with captions; the images have to be downloaded by the user.
The layout read here is that of ``img2dataset --output_format files`` (default 10,000 samples per folder), whose
key is the row number in the list: row ``i`` is ``images/{i // 10000:05d}/{i:09d}.jpg``. A row whose image
did not download is listed as missing (web sets lose a share of their URLs over time).

- CC3M: ``Train_GCC-training.tsv`` (caption TAB url, no header), images in ``images/``;
- CC12M: ``cc12m.tsv`` (url TAB caption, no header), images in ``images/``;
- SBU: ``SBU_captioned_photo_dataset_urls.txt`` and ``SBU_captioned_photo_dataset_captions.txt`` (line i of one
  matches line i of the other), images in ``images/``;
- VG captions: ``region_descriptions.json`` (``[{"id": image_id, "regions": [{"phrase", ...}]}]``), images in
  ``VG_100K/`` and ``VG_100K_2/``; one caption per distinct region phrase of an image.

Each writes ``train.json`` (``[{"image", "caption"}]``) and ``shards/`` (``vlprune data shards``' layout, from
the entries in a fixed shuffled order, so that each shard mixes the whole set). ``pretrain-4m`` (COCO Karpathy
train + VG + SBU + CC3M) and ``pretrain-14m`` (+ CC12M) read the prepared sets under ``--root`` (the ``--out``
of those targets) and write one shard set over all of them, with absolute image paths.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..data.shards import MANIFEST, write_shards
from .common import LayoutError, Split, Target, load_release_json, read_state, require_fields
from .vqa import vg_image

PER_FOLDER = 10_000


def img2dataset_path(i: int) -> str:
    return f"images/{i // PER_FOLDER:05d}/{i:09d}.jpg"


def read_tsv(path: Path, columns: int, target: str) -> List[List[str]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) != columns:
                raise LayoutError(f"{target}: {path.name} line {n} has {len(row)} tab-separated fields, the release "
                                  f"has {columns}")
            rows.append(row)
    return rows


def url_set(name: str, caption_col: int, url_col: int):
    def run(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
        rows = read_tsv(root / name, 2, name)
        if rows and not rows[0][url_col].startswith(("http://", "https://")):
            raise LayoutError(f"{name}: column {url_col + 1} of line 1 is not a URL ({rows[0][url_col][:60]!r}); "
                              "is this the publisher's file?")
        return [{"image": img2dataset_path(i), "caption": r[caption_col].strip()} for i, r in enumerate(rows)
                if r[caption_col].strip()]
    return run


def sbu(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
    urls = (root / "SBU_captioned_photo_dataset_urls.txt").read_text(encoding="utf-8").splitlines()
    caps = (root / "SBU_captioned_photo_dataset_captions.txt").read_text(encoding="utf-8").splitlines()
    if len(urls) != len(caps):
        raise LayoutError(f"sbu: {len(urls)} URLs but {len(caps)} captions; the release has one caption per URL")
    return [{"image": img2dataset_path(i), "caption": c.strip()} for i, c in enumerate(caps) if c.strip()]


def vg_captions(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
    data = load_release_json(root / "region_descriptions.json", "vg-captions")
    if not isinstance(data, list):
        raise LayoutError("vg-captions: region_descriptions.json must be a list of {'id', 'regions'}")
    require_fields(data, ("id", "regions"), "region_descriptions.json", "vg-captions")
    out = []
    for img in data:
        path, seen = vg_image(root, img["id"]), set()
        for r in img["regions"]:
            text = " ".join(str(r.get("phrase", "")).split())
            if text and text.lower() not in seen:
                seen.add(text.lower())
                out.append({"image": path, "caption": text})
    return out


MIXES = {"pretrain-4m": ("coco", "vg-captions", "sbu", "cc3m"),
         "pretrain-14m": ("coco", "vg-captions", "sbu", "cc3m", "cc12m")}


def mix(parts: Sequence[str]):
    def run(root: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
        out = []
        for part in parts:
            state = read_state(root / part)
            if "train" not in state["splits"]:
                raise LayoutError(f"{part}: not prepared under {root} (run `vlprune data prepare {part}` with "
                                  f"--out {root} first)")
            src = Path(state["root"])
            for e in json.loads((root / part / "train.json").read_text(encoding="utf-8")):
                out.append({"image": str(src / e["image"]), "caption": e["caption"], "source": part})
        return out
    return run


def write_pretrain_shards(root: Path, out: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    """``out/shards/`` from ``out/train.json`` in a shuffled order (seed ``shuffle_seed``); skipped when the shards
    of the same train.json (size and mtime) are already there."""
    src = out / "train.json"
    st = src.stat()
    tag = f"train.json:{st.st_size}:{st.st_mtime_ns}:seed{options.get('shuffle_seed', 0)}"
    dest = out / "shards"
    if (dest / MANIFEST).is_file() and json.loads((dest / MANIFEST).read_text())["source"] == tag:
        m = json.loads((dest / MANIFEST).read_text())
    else:
        entries = json.loads(src.read_text(encoding="utf-8"))
        random.Random(options.get("shuffle_seed", 0)).shuffle(entries)
        m = write_shards(entries, root, dest, int(options.get("shard_size", 10_000)), source=tag,
                         progress=bool(options.get("progress")), workers=int(options.get("workers", 0)))
    return {"shards": f"{m['samples']:,} samples in {len(m['shards'])} shard(s), {m['skipped']} bad image(s) -> "
            f"--train {str(dest / m['pattern'])!r}"}


def _pretrain(name: str, title: str, files: tuple, build, expected, layout: str) -> Target:
    return Target(name, title, files, (Split("train", build, "pretrain", expected),), layout=layout,
                  pretrain=True, options={"shuffle_seed": 0, "shard_size": 10_000}, finish=write_pretrain_shards)


# published counts: the lists' rows (what downloads today is less; ALBEF had 2.95M CC3M and 860K SBU images)
CC3M = _pretrain("cc3m", "Conceptual Captions 3M", ("Train_GCC-training.tsv", "images"),
                 url_set("Train_GCC-training.tsv", 0, 1), (3_318_333, None),
                 "ROOT/Train_GCC-training.tsv, ROOT/images/NNNNN/NNNNNNNNN.jpg (img2dataset files)")
CC12M = _pretrain("cc12m", "Conceptual 12M", ("cc12m.tsv", "images"), url_set("cc12m.tsv", 1, 0),
                  (12_423_374, None), "ROOT/cc12m.tsv, ROOT/images/NNNNN/NNNNNNNNN.jpg (img2dataset files)")
SBU = _pretrain("sbu", "SBU Captioned Photo", ("SBU_captioned_photo_dataset_urls.txt",
                                               "SBU_captioned_photo_dataset_captions.txt", "images"),
                sbu, (1_000_000, None), "ROOT/SBU_captioned_photo_dataset_{urls,captions}.txt, ROOT/images/...")
VG_CAPTIONS = _pretrain("vg-captions", "Visual Genome 1.2 region descriptions",
                        ("region_descriptions.json", "VG_100K"), vg_captions, (None, 108_077),
                        "ROOT/region_descriptions.json, ROOT/VG_100K/*.jpg, ROOT/VG_100K_2/*.jpg")
PRETRAIN_MIXES = tuple(
    _pretrain(name, f"ALBEF's {name[9:].upper()} pre-training mixture", tuple(f"{p}/{'prepared.json'}" for p in parts),
              mix(parts), (None, None), "ROOT = the --out of the parts: " + ", ".join(f"ROOT/{p}/" for p in parts))
    for name, parts in MIXES.items())
