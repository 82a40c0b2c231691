"""Training checkpoints: one ``checkpoint.pt`` per run directory, written atomically (temp file in the same
directory, fsync, then ``os.replace``) so that a reader never sees a partial file, and read with
``torch.load(weights_only=True)`` only. The state holds model/optimiser/scheduler/scaler state, the step and
micro-batch counters and the torch RNG states: only tensors and plain Python values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import torch

from .fileio import atomic_write

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(state: Dict[str, Any], directory: Union[str, Path]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return atomic_write(d / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(directory: Union[str, Path]) -> Dict[str, Any]:
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT} in {directory}: nothing to resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in several types
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def rng_state() -> Dict[str, Any]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
