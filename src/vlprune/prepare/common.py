"""What every ``vlprune data prepare`` target shares: the layout check, the per-split conversion with its checks
(counts, missing or unreadable images, duplicates), the resumable output and the report.

A target reads the files of one public release under ``--root`` (laid out as the publisher ships them) and writes
``OUT/NAME/SPLIT.json`` in one of the project's annotation formats (``vlprune.data.formats``). Per split:

1. the entries are built from the release's own files (a pure function of those files);
2. exact duplicates (same image(s) and same text) are dropped and counted;
3. every image is checked: ``exists`` (default: the file is there and not empty) or ``decode`` (decoded in full,
   with the training loader's checks); an entry whose image is missing or unreadable is dropped and listed in
   ``OUT/NAME/SPLIT.bad.json``;
4. the counts are compared with the real release's (``Target.expected``): a difference is reported, and is an
   error with ``strict``;
5. the split file is written atomically and recorded in ``OUT/NAME/prepared.json`` with a fingerprint of the
   source files (size and mtime), so that a second run skips it unless the sources changed (or ``redo``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..data.formats import SPECS, validate
from ..fileio import atomic_write

log = logging.getLogger(__name__)

STATE = "prepared.json"
CHECKS = ("exists", "decode", "none")
RUNTIME_OPTIONS = ("workers", "progress")  # options that do not change the output (a change does not redo a split)


class LayoutError(ValueError):
    """The folder is not the release a target reads (missing files, another release, missing splits)."""


@dataclass(frozen=True)
class Split:
    """One output split: ``build(root, options)`` returns its entries in ``fmt``; ``expected`` = (entries, images)
    in the real release (None: not published); ``images``: the entry field(s) holding image paths."""

    name: str
    build: Callable[[Path, Dict[str, Any]], List[Dict[str, Any]]]
    fmt: str
    expected: Tuple[Optional[int], Optional[int]] = (None, None)
    images: str = "image"
    sources: Tuple[str, ...] = ()  # the files it reads (a change redoes it); () = all of the target's files


@dataclass(frozen=True)
class Target:
    """A ``vlprune data prepare`` target: the files it needs under the root (all of them are checked before any
    work), an optional ``sniff(root)`` that raises LayoutError on a folder from another release, its splits."""

    name: str
    title: str
    files: Tuple[str, ...]
    splits: Tuple[Split, ...]
    sniff: Optional[Callable[[Path], None]] = None
    layout: str = ""
    pretrain: bool = False  # the splits are caption sets: also written as tar shards + manifest
    options: Dict[str, Any] = field(default_factory=dict)
    finish: Optional[Callable[[Path, Path, Dict[str, Any]], Dict[str, Any]]] = None  # extra files (root, out, opts)

    def split(self, name: str) -> Split:
        for s in self.splits:
            if s.name == name:
                return s
        raise ValueError(f"target {self.name!r} has no split {name!r}; its splits: {[s.name for s in self.splits]}")


def check_layout(target: Target, root: Path) -> None:
    """Raise LayoutError listing every missing file (and the target's expected layout) before any long work."""
    if not root.is_dir():
        raise LayoutError(f"{target.name}: --root {root} is not a directory")
    missing = [f for f in target.files if not any(root.glob(f))]
    if missing:
        raise LayoutError(f"{target.name}: {root} is not laid out like the {target.title} release: missing "
                          f"{', '.join(missing)} (expected layout: {target.layout or ', '.join(target.files)}; "
                          f"see docs/reproduce.md)")
    if target.sniff is not None:
        target.sniff(root)


def load_release_json(path: Path, target: str) -> Any:
    """A release's JSON file; bad JSON raises LayoutError naming the file and the target."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{target}: {path} is not the release's JSON file ({e})") from None


def load_jsonl(path: Path, target: str) -> List[Dict[str, Any]]:
    """A JSON-lines file (one object per line, blank lines ignored)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LayoutError(f"{target}: {path} line {n} is not JSON ({e}); expected JSON lines") from None
    return out


def require_fields(rows: Sequence[Dict[str, Any]], fields: Iterable[str], where: str, target: str) -> None:
    """LayoutError when the first row lacks a field the release has (a file from another release)."""
    if not rows:
        raise LayoutError(f"{target}: {where} holds no entries")
    first = rows[0]
    missing = [f for f in fields if not isinstance(first, dict) or f not in first]
    if missing:
        raise LayoutError(f"{target}: {where} is not from the expected release: its entries have no "
                          f"{', '.join(repr(m) for m in missing)} field")


def image_paths(entry: Dict[str, Any], key: str) -> List[str]:
    v = entry[key]
    return list(v) if isinstance(v, list) else [v]


def dedupe(entries: List[Dict[str, Any]], key: str) -> Tuple[List[Dict[str, Any]], int]:
    """Drop exact repeats of (images, text fields); keeps the first of each. Returns (entries, dropped)."""
    seen, out = set(), []
    for e in entries:
        sig = json.dumps([image_paths(e, key), e.get("caption"), e.get("sentence"), e.get("question"),
                          e.get("text"), e.get("question_id")], sort_keys=True, ensure_ascii=False)
        if sig not in seen:
            seen.add(sig)
            out.append(e)
    return out, len(entries) - len(out)


def image_problem(path: Path, check: str) -> Optional[str]:
    """Why the image at ``path`` cannot be used (None: fine) under ``check`` (one of CHECKS)."""
    if check == "none":
        return None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e})"
    if size == 0:
        return "empty file"
    if check == "decode":
        from ..data.images import BadImageError, open_image

        try:
            open_image(path)
        except (BadImageError, OSError) as e:
            return str(e)
    return None


def check_images(entries: List[Dict[str, Any]], key: str, root: Path, check: str, progress: bool,
                 desc: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]]]:
    """Entries whose images are all usable, and one record per unusable image (each image checked once)."""
    from tqdm import tqdm

    verdict: Dict[str, Optional[str]] = {}
    bad: List[Dict[str, str]] = []
    kept = []
    for e in tqdm(entries, disable=not progress, unit="entry", dynamic_ncols=True, desc=desc):
        ok = True
        for p in image_paths(e, key):
            if p not in verdict:
                verdict[p] = image_problem(root / p, check)
                if verdict[p] is not None:
                    bad.append({"image": p, "error": verdict[p]})
            ok = ok and verdict[p] is None
        if ok:
            kept.append(e)
    return kept, bad


def fingerprint(root: Path, files: Sequence[str]) -> str:
    """Size and mtime of the target's source files: a prepared split is redone when they change."""
    h = hashlib.sha256()
    for pattern in files:
        for p in sorted(root.glob(pattern)):
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_state(out: Path) -> Dict[str, Any]:
    p = out / STATE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {"splits": {}}


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8")))


def count_images(entries: Sequence[Dict[str, Any]], key: str) -> int:
    return len({p for e in entries for p in image_paths(e, key)})


def compare_counts(split: Split, entries: int, images: int) -> Optional[str]:
    """A line saying how the counts differ from the real release's (None when they match or are unknown)."""
    diffs = []
    for what, got, want in (("entries", entries, split.expected[0]), ("images", images, split.expected[1])):
        if want is not None and got != want:
            diffs.append(f"{got:,} {what} (the release has {want:,})")
    return f"split {split.name}: " + ", ".join(diffs) if diffs else None


def prepare_split(target: Target, split: Split, root: Path, out: Path, options: Dict[str, Any], check: str,
                  progress: bool) -> Dict[str, Any]:
    """Build, dedupe, check and write one split; returns its record for ``prepared.json``."""
    t0 = time.perf_counter()
    entries = split.build(root, options)
    if split.fmt in SPECS:  # else the target's builder checked its own format (grounding)
        entries = validate(entries, split.fmt, f"{target.name} {split.name}")
    entries, dups = dedupe(entries, split.images)
    kept, bad = check_images(entries, split.images, root, check, progress, f"{target.name} {split.name}")
    if not kept:
        raise ValueError(f"{target.name} {split.name}: no entry left: all {len(entries)} have missing or unreadable "
                         f"images (first: {bad[0]['image']}: {bad[0]['error']}); is --root the folder that holds "
                         f"the images as {target.layout or 'documented'}?")
    write_json_atomic(out / f"{split.name}.json", kept)
    if bad:
        write_json_atomic(out / f"{split.name}.bad.json", bad)
    n_img = count_images(kept, split.images)
    return {"file": f"{split.name}.json", "format": split.fmt, "entries": len(kept), "images": n_img,
            "dropped_entries": len(entries) - len(kept), "bad_images": len(bad), "duplicates": dups,
            "expected": {"entries": split.expected[0], "images": split.expected[1]},
            "differs": compare_counts(split, len(kept), n_img), "seconds": round(time.perf_counter() - t0, 2)}


def run_target(target: Target, root: Path, out: Path, splits: Optional[Sequence[str]] = None,
               check: str = "exists", strict: bool = False, redo: bool = False, progress: bool = False,
               options: Optional[Dict[str, Any]] = None,
               say: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Prepare ``target`` from ``root`` into ``out`` (= OUT/NAME). Returns the state (``prepared.json``)."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {list(CHECKS)}, got {check!r}")
    names = [s.name for s in target.splits]
    wanted = list(splits) if splits else names
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise ValueError(f"{target.name}: unknown split(s) {unknown}; its splits: {names}")
    check_layout(target, root)
    opts = {k: v for k, v in {**target.options, **(options or {})}.items() if k not in RUNTIME_OPTIONS}
    runtime = {**opts, "progress": progress, **{k: v for k, v in (options or {}).items() if k in RUNTIME_OPTIONS}}
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out)
    state.update({"target": target.name, "root": str(root.resolve()), "options": opts})
    for name in wanted:
        fp = fingerprint(root, target.split(name).sources or target.files)
        done = state["splits"].get(name)
        if done and not redo and done.get("source") == fp and done.get("options") == opts \
                and (out / done["file"]).is_file():
            say(f"{target.name} {name}: already prepared ({done['entries']:,} entries), skipped")
            continue
        rec = prepare_split(target, target.split(name), root, out, opts, check, progress)
        rec.update({"source": fp, "options": opts, "check": check})
        state["splits"][name] = rec
        write_json_atomic(out / STATE, state)
        say(f"{target.name} {name}: {rec['entries']:,} entries, {rec['images']:,} images -> {out / rec['file']}"
            + (f"; dropped {rec['dropped_entries']:,} with {rec['bad_images']:,} missing/unreadable image(s) "
               f"(listed in {out / (name + '.bad.json')})" if rec["bad_images"] else "")
            + (f"; {rec['duplicates']:,} duplicate(s) removed" if rec["duplicates"] else ""))
        if rec["differs"]:
            if strict:
                raise ValueError(f"{target.name}: {rec['differs']} (--strict); the split file is written, the "
                                 "counts differ from the full release")
            say(f"  note: {rec['differs']}")
    if target.finish is not None:
        state["extra"] = target.finish(root, out, runtime)
        say(f"{target.name}: " + ", ".join(f"{k}: {v}" for k, v in state["extra"].items()))
    write_json_atomic(out / STATE, state)
    return state
