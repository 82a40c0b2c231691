"""File helpers: atomic writes (a temp file in the same directory, fsync, then ``os.replace``, so that a reader never
sees a partial file and an interrupted write leaves the old file, and no temp file, behind) and JSON reading whose
errors name the file and the position."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union


class DiskFullError(OSError):
    """No space left on the device (or quota exceeded) while writing a file: the previous file is kept."""


class _Recorder:
    """A binary file that remembers the OSError of a failed write, so that a writer (``torch.save``) that replaces
    it with its own message cannot hide that the disk was full."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _open(fd: int) -> BinaryIO:
    return os.fdopen(fd, "wb")


def _disk_full(e: BaseException, recorded: Optional[OSError]) -> Optional[OSError]:
    for err in (e, recorded):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
    return None


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically; ``write`` receives the open binary temp file. A full disk raises
    ``DiskFullError`` naming the file (the previous one, if any, is untouched)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    rec = None
    try:
        with _open(fd) as raw:
            rec = _Recorder(raw)
            write(rec)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = _disk_full(e, rec.error if rec is not None else None)
        if full is not None:
            raise DiskFullError(full.errno, f"disk full: no space left to write {path} ({full.strerror}); the "
                                f"previous {path.name}, if any, is unchanged. Free space and run again") from e
        raise
    return path


def read_json(path: Union[str, Path], what: str = "file") -> Any:
    """Parse a JSON file; a missing file raises FileNotFoundError ("{what} not found: path"), bad JSON or text a
    ValueError naming the file and the position."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{p}: JSON nested too deeply to read (lists or objects inside each other beyond Python's "
                         "recursion limit)") from None
