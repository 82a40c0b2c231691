"""Guards of a training run against silent mistakes: the inputs a run was started on (resume refuses other data),
non-finite numbers (learning rates, losses, weights), and the hints a run directory without a checkpoint gives.

Inputs. A fresh run records ``RUN/inputs.json``: the resolved (``realpath``) path and a fingerprint of every file
a resume reads again (the ``--train`` annotation file, or the manifest of ``--train`` shards, ``--val``,
``--answers`` and the ``--teacher`` model's files). The fingerprint is size + sha256 for a file of at most
``HASH_LIMIT`` bytes (annotation files), size + modification time for a larger one (model weights), so checking
it stays cheap. ``--resume`` recomputes them and refuses a file that changed or a path that now resolves
elsewhere, naming the file; ``accept_changed_inputs`` (``--accept-changed-inputs``) accepts the change and
records the new fingerprints. Image files are not fingerprinted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from .fileio import atomic_write, read_json

log = logging.getLogger(__name__)
INPUTS_FILE = "inputs.json"
HASH_LIMIT = 64 << 20  # bytes: larger files are fingerprinted by size + mtime
MAX_SEED = 2**63 - 1


# ---- numbers ------------------------------------------------------------------------------------------------------
def check_finite(name: str, value: Any, minimum: float = 0.0, strict: bool = True) -> float:
    """``value`` as a float; raises ValueError naming ``name`` unless it is a finite number > ``minimum``
    (>= with ``strict=False``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and (v > minimum if strict else v >= minimum)
    if not ok:
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {rel} {minimum:g}, got {value!r}")
    return v


def check_lr_mult(mult: Dict[str, Any], flag: str = "lr_mult") -> None:
    """Per-module multipliers: finite and >= 0 (0 freezes the module)."""
    for k, v in mult.items():
        check_finite(f"{flag} {k}", v, 0.0, strict=False)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    return seed


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite: the run stops (exit code 2) and keeps its last good checkpoint."""


def raise_if_nonfinite(total: Optional[torch.Tensor], step: int, saved: Optional[int], out: Path,
                       world: int = 1) -> None:
    """Raise ``NonFiniteLossError`` naming ``step`` when ``total`` (the summed loss of the micro-batches since the
    last logged row, so it holds every loss of this step) is NaN or infinite on any rank. Called before the
    optimiser step, so no weight is touched by it."""
    if total is None and world == 1:
        return
    if total is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.bool, device=device)
    else:
        bad = ~torch.isfinite(total.detach().float()).all()
    if world > 1:
        import torch.distributed as dist

        flag = bad.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = flag[0] > 0
    if not bool(bad):
        return
    raise NonFiniteLossError(f"the loss is not finite (NaN or infinite) at step {step}: training stopped before "
                             f"that step changed any weight; {_advice(saved, out)}")


def _advice(saved: Optional[int], out: Path) -> str:
    kept = (f"the last checkpoint (step {saved}) is kept in {out}" if saved
            else "no checkpoint had been written yet")
    return (f"{kept}. The run diverged: train again with a lower --lr (or --lr-mult), a --grad-clip, or checked "
            "data (--lr cannot change on --resume)")


_NONFINITE = re.compile(r"\b(nan|inf|infinity|non-finite|not finite)\b", re.IGNORECASE)


def diverged(e: BaseException, step: int, saved: Optional[int], out: Path) -> Optional[BaseException]:
    """The error to stop a run with when ``e``, raised inside step ``step``, comes from non-finite numbers (a
    ``NonFiniteLossError``, or an error of torch about NaN / infinite values, e.g. sampling from NaN
    probabilities after the weights blew up): a ``NonFiniteLossError`` naming the step; else None."""
    if isinstance(e, NonFiniteLossError):
        return e
    if isinstance(e, RuntimeError) and _NONFINITE.search(str(e)):
        first = str(e).strip().splitlines()[0]
        return NonFiniteLossError(f"non-finite values (NaN or infinite) inside step {step} ({first}); "
                                  f"{_advice(saved, out)}")
    return None


def nonfinite_weights(state: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite_weights(model: torch.nn.Module, where: Any) -> None:
    """Refuse a model whose parameters or buffers hold NaN or infinity (it would score 0 without a warning)."""
    bad = nonfinite_weights(model.state_dict())
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"the model in {where} has non-finite weights (NaN or infinity) in {', '.join(bad[:3])}{more}: "
                         "its training diverged; retrain it (e.g. with a lower --lr)")


# ---- the files a run was started on -------------------------------------------------------------------------------
def fingerprint(path: os.PathLike) -> Dict[str, Any]:
    """{"size", "sha256"} of a file up to HASH_LIMIT bytes, {"size", "mtime_ns"} of a larger one."""
    st = os.stat(path)
    if st.st_size > HASH_LIMIT:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": st.st_size, "sha256": h.hexdigest()}


def resume_inputs(cfg) -> List[Tuple[str, str]]:
    """(flag, resolved path) of the files a resumed run of ``cfg`` reads again."""
    from .data.shards import MANIFEST, expand_pattern, is_shard_spec, is_url

    out: List[Tuple[str, str]] = []
    if cfg.train is not None:
        if not is_shard_spec(cfg.train):
            out.append(("--train", cfg.train))
        elif not is_url(cfg.train):
            out.append(("--train (shard manifest)", str(Path(expand_pattern(cfg.train)[0]).parent / MANIFEST)))
    if cfg.val is not None:
        out.append(("--val", cfg.val))
    if cfg.task_options.get("answers"):
        out.append(("--answers", cfg.task_options["answers"]))
    teacher = cfg.task_options.get("teacher")
    if teacher:
        from .tasks.finetune import checkpoint_dir

        d = checkpoint_dir(teacher)
        out += [("--teacher", str(p)) for p in sorted(d.iterdir()) if p.is_file() and p.suffix in (".json", ".safetensors")]
    return [(flag, os.path.realpath(p)) for flag, p in out]


def record_inputs(out: Path, cfg) -> None:
    """Write ``out/inputs.json`` for the files of ``resume_inputs(cfg)``."""
    rows = [{"flag": flag, "path": p, **fingerprint(p)} for flag, p in resume_inputs(cfg) if os.path.isfile(p)]
    text = json.dumps({"format": 1, "files": rows}, indent=1)
    atomic_write(Path(out) / INPUTS_FILE, lambda f: f.write(text.encode("utf-8")))


def _differences(rows: Iterable[Dict[str, Any]], now: List[Tuple[str, str]]) -> List[str]:
    current = {}
    for flag, p in now:
        current.setdefault(flag, []).append(p)
    problems = []
    for row in rows:
        flag, path = row.get("flag"), row.get("path")
        paths = current.get(flag, [])
        if path not in paths:
            problems.append(f"{flag} was {path}, now {', '.join(paths) or 'not given'}")
        elif not os.path.isfile(path):
            problems.append(f"{flag} {path} no longer exists")
        else:
            was = {k: row[k] for k in ("size", "sha256", "mtime_ns") if k in row}
            now_fp = fingerprint(path)
            if any(now_fp.get(k) != v for k, v in was.items()):
                what = "size" if now_fp["size"] != was.get("size") else "content" if "sha256" in was else "time"
                problems.append(f"{flag} {path} changed since the run started ({what} differs)")
    return problems


def check_inputs(out: Path, cfg) -> None:
    """Refuse to resume ``out`` when a file of ``resume_inputs(cfg)`` changed or resolves to another path than the
    run recorded (unless ``cfg.accept_changed_inputs``, which records the new state instead)."""
    path = Path(out) / INPUTS_FILE
    if not path.is_file():
        log.info("%s has no %s (written by an earlier version): its input files are not checked", out, INPUTS_FILE)
        return
    data = read_json(path, "run inputs record")
    rows = data.get("files", []) if isinstance(data, dict) else []
    problems = _differences(rows, resume_inputs(cfg))
    if not problems:
        return
    if getattr(cfg, "accept_changed_inputs", False):
        log.warning("resuming %s with changed inputs (--accept-changed-inputs): %s", out, "; ".join(problems))
        record_inputs(out, cfg)
        return
    raise ValueError(f"cannot resume {out} on other data: {'; '.join(problems)}. Restore the files the run started "
                     "on, train into a new --out, or pass --accept-changed-inputs to continue on the changed data")


# ---- output files ------------------------------------------------------------------------------------------------
def eval_inputs(args) -> List[Tuple[str, Optional[str]]]:
    """(flag, path) of what ``vlprune eval`` reads."""
    return [(f"--{name.replace('_', '-')}", getattr(args, name, None))
            for name in ("checkpoint", "test", "images", "answers", "init_official", "tokenizer")]


def check_output_file(path: Optional[str], overwrite: bool, flag: str,
                      inputs: Iterable[Tuple[str, Optional[str]]] = ()) -> None:
    """Refuse to write ``path`` when it exists (unless ``overwrite``) and, always, when it is one of ``inputs`` or
    lies inside an input directory (a checkpoint's own files)."""
    if path is None:
        return
    from .rundir import inside

    for name, src in inputs:
        if src is not None and os.path.exists(src) and os.path.exists(path) and inside(path, src):
            raise ValueError(f"{flag} {path} is (or is inside) the input {name} {src}; write it elsewhere")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a directory; give a file name")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass {flag.replace('--', '--overwrite-')} to replace it, or "
                              "choose another file")


# ---- run directories without a checkpoint -------------------------------------------------------------------------
def no_checkpoint_hint(out: Path) -> str:
    """Advice for a run directory that holds no checkpoint (stopped before its first one)."""
    if (Path(out) / "train_config.json").is_file():
        return ("; the run stopped before its first checkpoint, so there is nothing to continue: start it again with "
                "--overwrite (same arguments, without --resume)")
    return ""


def exists_hint(out: Path) -> str:
    from .checkpoint import has_checkpoint
    from .rundir import marked_kind

    if marked_kind(out) != "run":
        return "it is not a run directory that vlprune wrote, so it is left alone: choose another --out"
    if (Path(out) / "train_config.json").is_file() and not has_checkpoint(out):
        return ("it holds a run that stopped before its first checkpoint (nothing to resume): use --overwrite to "
                "start it again")
    return "use --overwrite to replace it or --resume to continue"
