"""Run-directory housekeeping for ``vlprune.train``: an exclusive lock, orphan temp files, metrics trimming, and
the ownership marker that ``--overwrite`` checks before it deletes anything.

Ownership. A directory vlprune writes (a training run, built-in or ``data scenes`` data) carries ``.vlprune``, a
small JSON file naming its kind (``{"kind": "run"}``). ``--overwrite`` empties a directory only when it is
empty, carries the marker of the command's kind (or, written by an earlier version, that kind's own files:
``train_config.json`` of a run, ``scenes.json`` of scenes data), and is not and does not contain an input of
the same command; every path is resolved (``realpath``) before the comparison, so a symbolic link or a
relative path cannot hide an input. Anything else is refused with an error that says what was found.

The lock is ``fcntl.flock`` on ``RUN/.lock`` (non-blocking, exclusive), held by rank 0 for the whole run; the file
holds the holder's pid and host. The kernel drops the lock when the process dies (even by kill -9), so a stale
lock file never blocks a later run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union

from .errors import CLIError
from .fileio import atomic_write

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
LOCK_FILE = ".lock"
METRICS = "metrics.jsonl"
MARKER = ".vlprune"
# kind -> files that mark a directory of that kind written by a version without the marker
LEGACY_SIGNS = {"run": ("train_config.json",), "data": ("scenes.json",), "demo": ("demo.json",)}


class RunDirBusyError(CLIError, RuntimeError):
    """Another process holds the run directory's lock (bad usage: exit code 2)."""


def _acquire(out: Path):
    import fcntl

    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown pid"
        os.close(fd)
        raise RunDirBusyError(f"run directory {out} is in use by another run ({holder}); wait for it to end "
                              "or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


@contextmanager
def run_lock(out: Path, rank: int = 0, world: int = 1) -> Iterator[None]:
    """Hold ``out/.lock`` (rank 0) while the block runs; every rank raises ``RunDirBusyError`` when it is held.
    A directory created here that holds nothing but the lock when the block ends is removed again, and a lock file
    created here in a directory that is not (or not yet) a marked run directory is removed too."""
    out = Path(out)
    created = not out.exists()
    lock_created = not (out / LOCK_FILE).exists()
    fd, error = None, None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = _acquire(out)
        except RunDirBusyError as e:
            error = str(e)
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunDirBusyError(error)
    try:
        yield
    finally:
        if fd is not None:
            if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
                (out / LOCK_FILE).unlink()
                out.rmdir()
            elif lock_created and not (out / MARKER).is_file():  # a refused run leaves a foreign directory as it was
                (out / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)  # releases the flock


def clear_run_dir(out: Path) -> None:
    """Delete everything in ``out`` but the lock file (which this process holds: deleting it would let another
    run lock a new one)."""
    for p in Path(out).iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def write_marker(out: Path, kind: str) -> None:
    """Mark ``out`` as a directory vlprune wrote (``kind``: run, data, demo)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")


def marked_kind(out: Path) -> Optional[str]:
    """The kind in ``out``'s marker, else the kind whose legacy files it holds, else None."""
    out = Path(out)
    try:
        kind = json.loads((out / MARKER).read_text(encoding="utf-8")).get("kind")
        if isinstance(kind, str):
            return kind
    except (OSError, ValueError, AttributeError):
        pass
    for kind, names in LEGACY_SIGNS.items():
        if any((out / n).is_file() for n in names):
            return kind
    return None


def _real(path: PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def inside(path: PathLike, directory: PathLike) -> bool:
    """Whether ``path`` is ``directory`` or lies below it, both resolved (symbolic links followed)."""
    p, d = _real(path), _real(directory)
    return os.path.commonpath([p, d]) == d


def check_overwrite(out: PathLike, kind: str, inputs: Iterable[Tuple[str, Optional[PathLike]]] = (),
                    flag: str = "--overwrite") -> None:
    """Raise unless ``out`` may be emptied by ``flag``: it must not be an input or hold one (``inputs``: (flag,
    path) pairs; None paths are skipped), and, when it holds anything, it must be a ``kind`` directory that
    vlprune wrote. Errors say what was found."""
    out = Path(out)
    for name, path in inputs:
        if path is not None and str(path) and inside(path, out):
            raise ValueError(f"{flag} would delete {out}, which holds the input {name} {path}; choose another --out")
    if out.is_symlink():
        raise ValueError(f"{flag}: {out} is a symbolic link (to {os.path.realpath(out)}); vlprune does not empty "
                         "a directory through a link: give the real path or another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    entries = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return
    found = marked_kind(out)
    if found != kind:
        what = f"a vlprune {found} directory" if found else f"no {MARKER} marker of a vlprune {kind} directory"
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(f"{flag} refuses to empty {out}: it holds {what} ({len(entries)} entries: {shown}); "
                              "vlprune only deletes directories it wrote itself. Choose another --out, or "
                              "delete it yourself")


def remove_orphan_temps(out: Path) -> None:
    """Delete temp files and checkpoint temp directories that an atomic write killed mid-way left behind
    (``.NAME.XXXX.tmp``); call under the lock."""
    for p in Path(out).glob(".*.tmp"):
        log.info("removing %s, left by an interrupted write", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def trim_metrics(out: Path, step: int) -> int:
    """Drop the rows of ``out/metrics.jsonl`` logged after ``step`` (and unreadable, e.g. half-written, lines) so
    that a resumed run does not repeat them. Returns the number of rows dropped."""
    path = Path(out) / METRICS
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            ok = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        text = "".join(line + "\n" for line in keep)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        log.info("dropped %d row(s) of %s after the checkpoint's step %d", dropped, path, step)
    return dropped
