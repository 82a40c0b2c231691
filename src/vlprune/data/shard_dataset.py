"""Streaming training data from WebDataset tar shards, split over DDP ranks and DataLoader workers, resumable
exactly.

The order of one epoch is a pure function of (seed, epoch, rank, world size, the shard list and the shard sizes
in the manifest), never of the number of DataLoader workers or of what was read before:

1. Shard order: the shards are permuted by a generator seeded from ``(seed, epoch)``.
2. Rank split: the shards' samples in that order form one sequence of ``N`` samples; rank ``r`` takes the
   contiguous range ``[r * n, (r + 1) * n)``, ``n = N // world`` (the last ``N % world`` samples of the epoch are
   left out, as ``DistributedSampler(drop_last=True)`` does). No sample goes to two ranks and none is missed.
3. Shuffle buffer: the rank's range streams through a buffer of ``buffer`` samples; each new sample replaces a
   random one, which is emitted (generator seeded from ``(seed, epoch, rank)``).
4. Batches: the emitted sequence is cut into batches of ``batch_size``; the tail is dropped. With ``W`` workers,
   worker ``w`` builds the batches ``first + w, first + w + W, ...``; PyTorch's DataLoader takes batches from its
   workers in turn, so the batches arrive in order 0, 1, 2, ... whatever ``W`` is.

Every worker walks the same (cheap) sequence of tar headers and buffer draws, and reads and decodes only the
images of its own batches (local shards are read with seeks; a stream from a URL must be read through).
Resuming at micro-batch ``b`` of an epoch (``set_position(epoch, b * batch_size)``) replays the headers and the
draws up to there without decoding anything, so the resumed run continues with exactly the sample after the last
one checkpointed; the data position is the trainer's epoch and micro-batch counters, and ``state()`` adds the
shard set's fingerprint to the checkpoint so that a resume over different shards is refused.

Local paths are read with :mod:`tarfile`; any other URL (``s3://``, ``https://``, ``pipe:``...) is opened with
``webdataset.gopen`` (``pip install "vlprune[shards]"``). This reader keeps its own iteration state rather than
``webdataset.WebDataset``'s pipeline, whose shuffle and worker split cannot be checkpointed exactly; the shards
themselves are ordinary WebDataset shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import random
import re
import tarfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import IterableDataset, get_worker_info

from .images import BadImageError, ImageLoader, decode_image, pil_to_tensor
from .shards import IMAGE_EXTS, MANIFEST, expand_pattern, is_url, read_manifest, shard_counts

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's key / extension split


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _open(url: str):
    if not is_url(url):
        return open(url.removeprefix("file:"), "rb")
    try:
        import webdataset
    except ImportError:
        raise ImportError(f"reading shards from {url} needs the webdataset package: pip install \"vlprune[shards]\"") from None
    return webdataset.gopen(url)


def load_manifest(urls: Sequence[str], manifest: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
    """The manifest of a shard list (default: ``manifest.json`` next to the first shard) and where it was read."""
    where = manifest or (urls[0].rsplit("/", 1)[0] + "/" + MANIFEST if "/" in urls[0] else MANIFEST)
    if not is_url(where):
        path = where.removeprefix("file:")
        if not Path(path).is_file():
            raise FileNotFoundError(f"shard manifest not found: {path} (write shards with `vlprune data shards`, "
                                    "which puts manifest.json next to them)")
        return read_manifest(path), path
    with _open(where) as f:
        return read_manifest(where, f.read().decode("utf-8")), where


class _Record:
    """One sample as seen in the header walk: its key and its members' extensions -> where to read them
    (``(offset, size)`` in a local shard, or the bytes of a streamed one)."""

    __slots__ = ("url", "key", "members")

    def __init__(self, url: str, key: str):
        self.url, self.key, self.members = url, key, {}


class _NotPlain(Exception):
    """A tar header this fast parser leaves to :mod:`tarfile` (PAX / GNU long names, base-256 sizes)."""


def _ustar_members(buf) -> Iterator[Tuple[str, Tuple[int, int]]]:
    """(name, (offset, size)) of the regular files of a plain ustar / v7 tar held in ``buf`` (an mmap): the
    headers are parsed in place, which is several times faster than ``tarfile`` for many small members."""
    pos, n = 0, len(buf)
    while pos + 512 <= n:
        h = buf[pos:pos + 512]
        if h.count(0) == 512:
            return
        typ, raw = h[156:157], h[124:136]
        if typ in (b"x", b"g", b"L", b"K") or raw[0] & 0x80:
            raise _NotPlain
        size = int(raw.strip(b"\0 ") or b"0", 8)
        name = h[:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        if typ in (b"0", b"\0", b"7"):
            yield name.decode("utf-8"), (pos + 512, size)
        pos += 512 + (size + 511) // 512 * 512


def _members(url: str) -> Iterator[Tuple[str, Any]]:
    """(name, location) of a shard's files, in order: (offset, size) for a local file, the bytes for a stream."""
    if is_url(url):
        with _open(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if m.isfile():
                    yield m.name, tar.extractfile(m).read()
        return
    with _open(url) as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                plain = list(_ustar_members(buf))  # all headers first: a fallback must not repeat members
        except _NotPlain:
            plain = None
        except ValueError:  # an empty file cannot be mapped
            plain = []
    if plain is not None:
        yield from plain
        return
    with _open(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:  # the general path
        for m in tar:
            if m.isfile():
                yield m.name, (m.offset_data, m.size)


def _walk(url: str, lo: int, hi: int) -> Iterator[_Record]:
    """Samples ``lo`` .. ``hi - 1`` of one shard (consecutive members sharing a key form a sample)."""
    n, rec = -1, None
    for name, loc in _members(url):
        match = _KEY.match(name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if rec is None or key != rec.key:
            if rec is not None and lo <= n:
                yield rec
            n += 1
            if n >= hi:
                return
            rec = _Record(url, key)
        if n >= lo:
            rec.members[ext] = loc
    if rec is not None and lo <= n:
        yield rec
    if n + 1 < hi:
        raise ValueError(f"shard {url} holds {n + 1} samples, fewer than its manifest says (at least {hi}); "
                         "rewrite the manifest or the shards")


class _Files:
    """Open local shards for reading members by (offset, size); the few most recently used stay open."""

    def __init__(self, keep: int = 8):
        self.keep, self.open = keep, OrderedDict()

    def read(self, url: str, loc) -> bytes:
        if isinstance(loc, bytes):
            return loc
        f = self.open.pop(url, None) or _open(url)
        self.open[url] = f
        while len(self.open) > self.keep:
            self.open.popitem(last=False)[1].close()
        f.seek(loc[0])
        return f.read(loc[1])

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()


def _buffered(records: Iterator[_Record], size: int, rng: random.Random) -> Iterator[_Record]:
    """A shuffle buffer: fill to ``size``; then each incoming sample replaces a random one, which is emitted."""
    buf: List[_Record] = []
    for r in records:
        if len(buf) < size:
            buf.append(r)
            continue
        j = rng.randrange(size)
        buf[j], r = r, buf[j]
        yield r
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """Caption samples (``image``, ``text``, ``image_id``, ``index``, ``key``) streamed from tar shards, one
    rank's share of an epoch per iteration, in batches of ``batch_size`` (see the module docstring)."""

    def __init__(self, pattern: str, loader: ImageLoader, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, buffer: int = 1000, skip_bad_images: bool = False, manifest: Optional[str] = None):
        if buffer < 1:
            raise ValueError(f"shuffle buffer must be >= 1 sample, got {buffer}")
        self.urls = expand_pattern(pattern)
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"shard pattern {pattern!r} names a shard twice")
        missing = [u for u in self.urls if not is_url(u) and not Path(u.removeprefix("file:")).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.urls)} shard(s) of {pattern!r} not found: "
                                    f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
        self.counts = shard_counts(self.urls, *load_manifest(self.urls, manifest))  # the manifest is not kept: workers
        # receive a pickled copy of the dataset
        self.loader, self.batch_size, self.rank, self.world = loader, batch_size, rank, world
        self.seed, self.buffer, self.skip_bad_images = seed, buffer, skip_bad_images
        self.num_samples = sum(self.counts) // world  # per rank and epoch
        if self.num_samples < batch_size:
            raise ValueError(f"{sum(self.counts)} samples in {len(self.urls)} shard(s) over {world} process(es) "
                             f"give no full batch of {batch_size}")
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int) -> None:
        """Start the next iteration at sample ``skip`` (a multiple of the batch size) of this rank's ``epoch``."""
        if skip < 0 or skip > self.num_samples or skip % self.batch_size:
            raise ValueError(f"skip must be a multiple of {self.batch_size} in [0, {self.num_samples}], got {skip}")
        self.epoch, self.skip = epoch, skip

    def fingerprint(self) -> str:
        """sha256 of the shard names and sizes: a resume checks it still reads the same shards."""
        names = [u.rstrip("/").rsplit("/", 1)[-1] for u in self.urls]
        return hashlib.sha256(json.dumps([names, self.counts]).encode()).hexdigest()

    def state(self) -> Dict[str, Any]:
        return {"kind": "shards", "fingerprint": self.fingerprint(), "rank_samples": self.num_samples,
                "world": self.world, "buffer": self.buffer}

    def shard_order(self, epoch: int) -> List[int]:
        order = list(range(len(self.urls)))
        random.Random(_seed(self.seed, epoch)).shuffle(order)
        return order

    def rank_records(self, epoch: int) -> Iterator[_Record]:
        """This rank's contiguous range of the epoch's sample sequence, in shard order (headers only)."""
        start, end = self.rank * self.num_samples, (self.rank + 1) * self.num_samples
        pos = 0
        for i in self.shard_order(epoch):
            n = self.counts[i]
            lo, hi = max(start - pos, 0), min(end - pos, n)
            if lo < hi:
                yield from _walk(self.urls[i], lo, hi)
            pos += n
            if pos >= end:
                return

    def sequence(self, epoch: int) -> Iterator[_Record]:
        """The rank's shuffled sample sequence of ``epoch`` (what the batches are cut from)."""
        return _buffered(self.rank_records(epoch), self.buffer, random.Random(_seed(self.seed, epoch, self.rank)))

    def __len__(self) -> int:
        return self.num_samples - self.skip

    def __iter__(self) -> Iterator[Optional[Dict[str, Any]]]:
        info = get_worker_info()
        workers, me = (1, 0) if info is None else (info.num_workers, info.id)
        bs, first = self.batch_size, self.skip // self.batch_size
        batches = self.num_samples // bs
        files = _Files()
        try:
            for pos, rec in enumerate(self.sequence(self.epoch)):
                b = pos // bs
                if b >= batches:
                    break
                if b >= first and (b - first) % workers == me:
                    yield self._item(rec, files)
        finally:
            files.close()

    def _item(self, rec: _Record, files: _Files) -> Optional[Dict[str, Any]]:
        name = f"{rec.url}:{rec.key}"
        image = next((e for e in rec.members if e in IMAGE_EXTS), None)
        try:
            if image is None:
                raise BadImageError(f"no image member for sample {name} (expected one of .{', .'.join(IMAGE_EXTS)})")
            img = decode_image(io.BytesIO(files.read(rec.url, rec.members[image])), name, self.loader.max_pixels)
        except BadImageError:
            if not self.skip_bad_images:
                raise
            return None
        meta, text = _text(rec, files)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"sample {name} has no caption (.txt member or \"caption\" in its .json)")
        iid = meta.get("iid", zlib.crc32(rec.key.encode()) & 0x7FFFFFFF)
        l = self.loader
        return {"image": pil_to_tensor(img, l.image_size, l.mean, l.std), "text": text, "image_id": int(iid),
                "index": int(meta.get("index", -1)), "key": rec.key.rsplit("/", 1)[-1]}


def _text(rec: _Record, files: _Files) -> Tuple[Dict[str, Any], Any]:
    """(the .json metadata or {}, the caption: the .txt member, else the metadata's "caption"); a member that is
    not UTF-8 or not a JSON object raises ValueError naming the sample and the member."""
    name = f"sample {rec.url}:{rec.key}"
    meta: Any = {}
    if "json" in rec.members:
        try:
            meta = json.loads(files.read(rec.url, rec.members["json"]).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: its .json member is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: its .json member is malformed JSON (line {e.lineno} column {e.colno}: "
                             f"{e.msg})") from None
        except RecursionError:
            raise ValueError(f"{name}: its .json member is nested too deeply") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{name}: its .json member must hold a JSON object, got {type(meta).__name__}")
    if "txt" in rec.members:
        try:
            return meta, files.read(rec.url, rec.members["txt"]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: its .txt member is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return meta, meta.get("caption")


def tar_problem(path: str) -> Optional[str]:
    """Why a local file is not a complete tar archive (empty, not a tar, truncated: a member or the end-of-archive
    blocks cut off), or None when it is one."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    try:
        with tarfile.open(path, mode="r:") as tar:
            end = 0
            for m in tar:
                end = m.offset_data + (m.size + 511) // 512 * 512
                if m.offset_data + m.size > size:
                    return f"truncated: member {m.name} needs {m.offset_data + m.size} bytes, the file has {size}"
    except tarfile.TarError as e:
        return f"not a tar archive ({e})"
    if end == 0:
        return "a tar archive with no member"
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.count(0) != 1024:
        return "truncated: the end-of-archive blocks are missing (the file was cut after a member)"
    return None


def shard_texts(pattern: str, limit: int = 200_000, manifest: Optional[str] = None) -> List[str]:
    """Captions of the first ``limit`` samples in shard-list order (to train a tokenizer from scratch)."""
    urls = expand_pattern(pattern)
    counts = shard_counts(urls, *load_manifest(urls, manifest))
    out: List[str] = []
    files = _Files()
    try:
        for url, n in zip(urls, counts):
            out += [str(_text(rec, files)[1]) for rec in _walk(url, 0, min(n, limit - len(out)))]
            if len(out) >= limit:
                break
    finally:
        files.close()
    return out


def index_shards(pattern: str, progress: bool = False) -> Dict[str, Any]:
    """Write ``manifest.json`` next to existing local WebDataset shards (e.g. from ``webdataset.TarWriter``):
    samples (groups of members sharing a key) and sha256 per shard. Returns the manifest."""
    from tqdm import tqdm

    from ..fileio import atomic_write
    from .shards import MANIFEST_FORMAT, file_sha256

    urls = expand_pattern(pattern)
    remote = [u for u in urls if is_url(u)]
    if remote:
        raise ValueError(f"indexing reads local shards only, got {remote[0]}")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shard(s) not found: {', '.join(missing[:3])}")
    dirs = {str(Path(u).parent) for u in urls}
    if len(dirs) != 1:
        raise ValueError(f"the shards of one manifest must share a folder, got {sorted(dirs)[:3]}")
    problems = [f"{u}: {why}" for u in urls if (why := tar_problem(u)) is not None]
    if problems:
        raise ValueError(f"{len(problems)} of {len(urls)} shard(s) cannot be indexed: {'; '.join(problems[:5])}"
                         f"{'; ...' if len(problems) > 5 else ''}; no manifest was written")
    shards = []
    for u in tqdm(urls, disable=not progress, unit="shard", dynamic_ncols=True, desc="index"):
        keys, last = 0, None
        for name, _ in _members(u):
            m = _KEY.match(name)
            if m is not None and m.group(1) != last:
                keys, last = keys + 1, m.group(1)
        shards.append({"name": Path(u).name, "samples": keys, "bytes": Path(u).stat().st_size, "sha256": file_sha256(u)})
    manifest = {"format": MANIFEST_FORMAT, "source": pattern, "shard_size": max(s["samples"] for s in shards),
                "pattern": Path(pattern).name, "entries": sum(s["samples"] for s in shards),
                "samples": sum(s["samples"] for s in shards), "skipped": 0, "shards": shards, "bad": []}
    atomic_write(Path(dirs.pop()) / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode("utf-8")))
    return manifest
