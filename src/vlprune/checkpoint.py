"""Training checkpoints, kept the way familiar trainers keep them: one directory per saved step, a ``latest``
pointer, and only the newest ``keep`` of them (``--save-total-limit``)::

    RUN/checkpoint-120/state.pt     the training state at optimiser step 120
    RUN/checkpoint-160/state.pt
    RUN/latest                      "checkpoint-160": the one a resume starts from

The state is an extensible dict (model/optimiser/scheduler/scaler state, the step and micro-batch counters, the
torch RNG states; callers may add entries): only tensors and plain Python values, written with ``torch.save`` and
read with ``torch.load(weights_only=True)`` only, so nothing in a checkpoint can run code.

Every write is atomic: the state goes to a temp directory (``.checkpoint-STEP.XXXX.tmp``, fsync'ed) that is
renamed to ``checkpoint-STEP`` in one step; then ``latest`` is replaced atomically; then older checkpoints beyond
``keep`` (and any of a later step, left by an abandoned future of the run) are deleted. A kill at any point leaves
``latest`` naming a complete checkpoint. Run directories of earlier versions hold one ``checkpoint.pt``: it is
still read when there is no ``latest``, and deleted once a newer checkpoint is written.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .fileio import DiskFullError, atomic_write

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
PREFIX = "checkpoint-"
STATE = "state.pt"
LATEST = "latest"
LEGACY = "checkpoint.pt"  # the single-file layout of earlier versions
CHECKPOINT = LEGACY  # kept for imports of earlier versions
# the entries of a training state that a resume needs
TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "micro", "skipped", "rng")
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(directory: PathLike) -> List[Tuple[int, Path]]:
    """(step, path) of the complete ``checkpoint-STEP`` directories in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return sorted(found)


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The state file a resume starts from: the one ``latest`` names, else (a kill between the rename and the
    pointer, or a pointer deleted by hand) the newest complete checkpoint, else a legacy ``checkpoint.pt``."""
    d = Path(directory)
    pointer = d / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if _NAME.match(name) and (d / name / STATE).is_file():
            return d / name / STATE
        log.warning("%s names %r, which is not a complete checkpoint; using the newest one instead", pointer, name)
    found = checkpoints(d)
    if found:
        return found[-1][1] / STATE
    return d / LEGACY if (d / LEGACY).is_file() else None


def has_checkpoint(directory: PathLike) -> bool:
    return latest_checkpoint(directory) is not None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Dict[str, Any], directory: PathLike, keep: int = 1) -> Path:
    """Write ``state`` (which must hold an integer ``"step"``) as ``directory/checkpoint-STEP/state.pt``, point
    ``latest`` at it and keep the newest ``keep`` checkpoints. Returns the state file's path."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep (--save-total-limit) must be an integer >= 1, got {keep!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    name = f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(dir=d, prefix=f".{name}.", suffix=".tmp"))
    try:
        atomic_write(tmp / STATE, lambda f: torch.save(state, f))
        final = d / name
        if final.exists():  # the same step saved again (a resumed run passing it a second time)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except DiskFullError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(d)
        raise DiskFullError(e.errno, f"disk full: no space left to write the checkpoint of step {step} in {d}; "
                            + (f"the previous checkpoint {kept.parent.name} is kept, and --resume continues from "
                               "it once space is freed" if kept else "no earlier checkpoint exists")) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(d)
    atomic_write(d / LATEST, lambda f: f.write(f"{name}\n".encode()))
    _prune(d, step, keep)
    return d / name / STATE


def _prune(d: Path, step: int, keep: int) -> None:
    """Delete the checkpoints beyond the newest ``keep`` up to ``step``, those after ``step`` and a legacy file."""
    found = checkpoints(d)
    older = [p for s, p in found if s <= step]
    for p in older[:-keep] + [p for s, p in found if s > step]:
        shutil.rmtree(p, ignore_errors=True)
    if (d / LEGACY).is_file():
        (d / LEGACY).unlink()


def remove_checkpoints(directory: PathLike) -> None:
    """Delete every checkpoint of a run directory (a finished run that keeps only ``model/``)."""
    d = Path(directory)
    for _, p in checkpoints(d):
        shutil.rmtree(p, ignore_errors=True)
    for f in (d / LATEST, d / LEGACY):
        if f.is_file():
            f.unlink()


def read_state(path: PathLike) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)``; an unreadable file raises ValueError giving the reason."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read checkpoint {path}: the file is empty (0 bytes); a write that never finished "
                         "or a copy that failed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in several types
        raise ValueError(f"cannot read checkpoint {path}: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    """A short reason for a failed ``torch.load``, without torch's advice to retry with ``weights_only=False``
    (vlprune never unpickles code from a file)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    detail = m.group(1).strip().splitlines()[0] if m else ""
    if "Unsupported global" in detail:
        name = re.search(r"GLOBAL (\S+)", detail)
        what = f" ({name.group(1)})" if name else ""
        return (f"it holds Python objects other than tensors and plain values{what}; vlprune reads checkpoints as "
                "data only and never runs code from them")
    if isinstance(e, EOFError):
        return "the file ends early: truncated or damaged"
    return "not a PyTorch checkpoint file, or a damaged one"


def load_checkpoint(directory: PathLike) -> Dict[str, Any]:
    """The training state a resume of the run directory starts from (see ``latest_checkpoint``)."""
    path = latest_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {directory} (no {LATEST}, {PREFIX}STEP/ or {LEGACY}): nothing to "
                                "resume")
    state = read_state(path)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"cannot read checkpoint {path}: not a vlprune training state (no 'step' entry)")
    missing = [k for k in TRAINING_KEYS if k not in state]
    if "model" in state and missing:
        raise ValueError(f"cannot resume from {path}: it lacks the entries {missing} of this vlprune version's "
                         "training state (written by another version?); train into a new --out, e.g. with --init of "
                         "this run's model/")
    return state


def log_state(sums: Dict[str, Any], n: int) -> Dict[str, Any]:
    """The running sums of the metrics row being accumulated (plain floats), so that a resumed run logs the same
    rows as an uninterrupted one."""
    return {"n": int(n), "sums": {k: float(v) for k, v in sums.items()}}


def restore_log(saved: Optional[Dict[str, Any]], world: int = 1) -> Tuple[Dict[str, Any], int]:
    """(sums, n) to continue a metrics row from a checkpoint's ``log_state`` (rank 0's: restored in a
    single-process run only; a distributed run starts the row afresh)."""
    if not saved or world > 1:
        return {}, 0
    return dict(saved.get("sums", {})), int(saved.get("n", 0))


def rng_state() -> Dict[str, Any]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
