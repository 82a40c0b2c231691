"""WebDataset tar shards: writing them from an annotation file, their manifest, and shard patterns.

A shard is a plain (uncompressed) tar file. Each sample is a group of consecutive members sharing a *key* (the
member name up to its first dot), as WebDataset expects::

    000000042.jpg    the image file's own bytes (JPEG or PNG kept as they are; other formats re-encoded as PNG)
    000000042.txt    the caption (UTF-8)
    000000042.json   the annotation entry: image, caption, extra fields, "index" (the entry's position in the
                     source file) and "iid" (one integer per distinct image, as the JSON loader numbers them)

Keys are the entry index, zero-padded to 9 digits, so they are unique within a shard set and sort in source
order. Members carry fixed metadata (mtime 0, uid/gid 0, mode 0644): the same input gives byte-identical shards.
``manifest.json`` next to the shards records the shard size, the number of samples and the sha256 of every shard,
and every entry that was left out with the reason (its index, its image path, the error).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ..fileio import atomic_write
from .images import BadImageError, open_image

PathLike = Union[str, Path]
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vlprune-shards/1"
KEY_DIGITS = 9
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_pattern(pattern: str) -> List[str]:
    """Brace-expand a shard pattern: ``{000..012}`` (inclusive numeric range, zero padding kept from the
    first bound) and ``{a,b,c}`` (alternatives); several braces multiply. ``"s/{00..02}.tar"`` ->
    ``["s/00.tar", "s/01.tar", "s/02.tar"]``. A pattern without braces is returned as it is."""
    start = pattern.find("{")
    end = pattern.find("}", start + 1)
    if start < 0 and "}" not in pattern:
        return [pattern]
    body = pattern[start + 1:end] if 0 <= start < end else ""
    head, tail = pattern[:start], pattern[end + 1:]
    m = _RANGE.fullmatch("{" + body + "}")
    if m is not None:
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} ends before it starts")
        alts = [str(i).zfill(len(m.group(1))) for i in range(lo, hi + 1)]
    elif "," in body and "{" not in body:
        alts = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: unbalanced or empty brace (use {{000..012}} or {{a,b}})")
    return [x for alt in alts for x in expand_pattern(head + alt + tail)]


def is_url(spec: str) -> bool:
    """Whether a shard name has a URL scheme (``s3://``, ``https://``, ``pipe:``) rather than a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", spec) is not None and not re.match(r"^[A-Za-z]:[\\/]", spec) \
        and not spec.startswith("file:")


def is_shard_spec(spec: Optional[str]) -> bool:
    """Whether a ``--train`` value names tar shards (a pattern or list ending in ``.tar``) rather than a JSON file."""
    if not spec:
        return False
    try:
        names = expand_pattern(spec)
    except ValueError:
        return "{" in spec and ".tar" in spec  # a malformed pattern: let the shard reader name the problem
    return all(n.endswith(".tar") for n in names)


def sample_key(index: int) -> str:
    return str(index).zfill(KEY_DIGITS)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def image_bytes(path: Path) -> Tuple[bytes, str]:
    """(bytes, extension) to store for an image file, after decoding it fully (raises BadImageError /
    FileNotFoundError naming the path when it cannot be used): JPEG and PNG files keep their bytes; any other
    format is stored as a lossless PNG of the RGB image the loader would produce."""
    from PIL import Image

    rgb = open_image(path)  # the same checks (and errors) as training: missing, empty, truncated, bomb, not an image
    with Image.open(path) as img:
        fmt = img.format
    if fmt in ("JPEG", "PNG"):
        return path.read_bytes(), "jpg" if fmt == "JPEG" else "png"
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _image_ids(entries: Sequence[Dict[str, Any]]) -> List[int]:
    table: Dict[Any, int] = {}
    return [table.setdefault(e.get("image_id", e["image"]), len(table)) for e in entries]


def _prepare(path: Path) -> Any:
    """``image_bytes(path)``, or the error that makes the image unusable (returned, so it crosses processes)."""
    try:
        return image_bytes(path)
    except (BadImageError, FileNotFoundError) as err:
        return err


def _prepared(paths: Sequence[Path], workers: int, stack: ExitStack) -> Iterator[Any]:
    """``_prepare`` of each run of equal consecutive paths, in order; in ``workers`` processes when > 0."""
    runs = [p for i, p in enumerate(paths) if i == 0 or p != paths[i - 1]]
    if workers <= 0:
        return map(_prepare, runs)
    import multiprocessing

    pool = stack.enter_context(multiprocessing.get_context().Pool(workers))
    return pool.imap(_prepare, runs, chunksize=16)


def write_shards(entries: Sequence[Dict[str, Any]], images: PathLike, out: PathLike, shard_size: int,
                 source: str = "", progress: bool = False,
                 on_bad: Optional[Callable[[int, str, str], None]] = None, workers: int = 0) -> Dict[str, Any]:
    """Write ``entries`` (validated pre-training / retrieval-train entries: ``image``, ``caption``) with images
    under ``images`` into ``out/000000.tar``, ... of ``shard_size`` samples each, then ``out/manifest.json``
    (returned). Every image is decoded first; an unusable one is left out, passed to ``on_bad(index, image,
    error)`` and listed in the manifest. Each shard and the manifest are written atomically. ``workers`` > 0
    checks images in that many processes (the shards are the same bytes either way)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size must be an integer >= 1, got {shard_size!r}")
    from tqdm import tqdm

    out, root = Path(out), Path(images)
    out.mkdir(parents=True, exist_ok=True)
    iids = _image_ids(entries)
    shards: List[Dict[str, Any]] = []
    bad: List[Dict[str, Any]] = []
    pending: List[Tuple[str, Dict[str, bytes]]] = []

    def flush() -> None:
        name = f"{len(shards):06d}.tar"

        def write(f):
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in pending:
                    for ext, data in members.items():
                        _member(tar, f"{key}.{ext}", data)

        path = atomic_write(out / name, write)
        shards.append({"name": name, "samples": len(pending), "bytes": path.stat().st_size, "sha256": file_sha256(path)})
        pending.clear()

    paths = [Path(e["image"]) if Path(e["image"]).is_absolute() else root / e["image"] for e in entries]
    with ExitStack() as stack:
        results = _prepared(paths, workers, stack)
        last: Optional[Path] = None
        for i, e in enumerate(tqdm(entries, disable=not progress, unit="sample", dynamic_ncols=True, desc="shards")):
            if paths[i] != last:  # consecutive captions of one image share one decode
                last, res = paths[i], next(results)
            if isinstance(res, Exception):
                bad.append({"index": i, "image": e["image"], "error": str(res)})
                if on_bad is not None:
                    on_bad(i, e["image"], str(res))
                continue
            data, ext = res
            meta = {**e, "index": i, "iid": iids[i]}
            pending.append((sample_key(i), {ext: data, "txt": e["caption"].encode("utf-8"),
                                            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}))
            if len(pending) == shard_size:
                flush()
    if pending:
        flush()
    if not shards:
        raise ValueError(f"no usable sample: all {len(entries)} images were bad (first: {bad[0]['error'] if bad else '-'})")
    manifest = {"format": MANIFEST_FORMAT, "source": source, "shard_size": shard_size,
                "pattern": f"{{{0:06d}..{len(shards) - 1:06d}}}.tar", "entries": len(entries),
                "samples": sum(s["samples"] for s in shards), "skipped": len(bad), "shards": shards, "bad": bad}
    atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode("utf-8")))
    return manifest


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(directory: PathLike) -> List[str]:
    """Names of the shards in ``directory`` whose size or sha256 differs from the manifest (empty: all good)."""
    d = Path(directory)
    manifest = read_manifest(d / MANIFEST)
    bad = []
    for s in manifest["shards"]:
        p = d / s["name"]
        if not p.is_file() or file_sha256(p) != s["sha256"]:
            bad.append(s["name"])
    return bad


def read_manifest(path: PathLike, text: Optional[str] = None) -> Dict[str, Any]:
    """Parse and check a shard manifest (``text`` when it was fetched from a URL); errors name the file."""
    from ..fileio import read_json

    data = read_json(path, "shard manifest") if text is None else json.loads(text)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("shards"), list):
        raise ValueError(f"{path}: not a vlprune shard manifest (expected format {MANIFEST_FORMAT!r}); write shards "
                         "with `vlprune data shards`")
    for s in data["shards"]:
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int)
                and s["samples"] >= 0):
            raise ValueError(f"{path}: malformed shard record {s!r} (needs name and samples)")
    return data


def shard_counts(urls: Iterable[str], manifest: Dict[str, Any], where: str) -> List[int]:
    """Samples per shard for ``urls``, looked up in the manifest by file name; unknown shards raise."""
    table = {s["name"]: s["samples"] for s in manifest["shards"]}
    out = []
    for u in urls:
        name = u.rstrip("/").rsplit("/", 1)[-1]
        if name not in table:
            raise ValueError(f"shard {u} is not listed in {where} (it lists {len(table)} shards: "
                             f"{', '.join(sorted(table)[:3])}{', ...' if len(table) > 3 else ''})")
        out.append(table[name])
    return out
