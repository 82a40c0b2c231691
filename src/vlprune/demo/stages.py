"""Cached, resumable stages: each writes into ``OUT/<name>/`` and, once finished, ``done.json`` with the hash of
its settings, its result and its wall time. Running again with the same settings skips it (and says so); other
settings redo it. A stage's settings include the keys of the stages it reads from, so a change upstream redoes
everything downstream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

log = logging.getLogger(__name__)
DONE = "done.json"
# bump when what a stage computes changes, so that old results are not reused
VERSION = 1


def settings_key(settings: Mapping[str, Any], out: Optional[Path] = None) -> str:
    """The hash of a stage's settings. Paths inside ``out`` are hashed relative to it, so that a demo directory
    that was moved or copied keeps its finished stages."""
    text = json.dumps({"version": VERSION, **settings}, sort_keys=True, default=str)
    if out is not None:
        text = text.replace(json.dumps(str(out))[1:-1], "<OUT>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Stages:
    """Runs stages one at a time with an overall progress bar (stderr; ``quiet`` silences it). ``weights``: each
    planned stage's rough cost; the bar advances by it, and a skipped stage's cost leaves the total, so that the
    ETA is about the work still to do."""

    def __init__(self, out: Path, weights: Mapping[str, float], say: Callable[[str], None], quiet: bool = False):
        from tqdm import tqdm

        self.out, self.say, self.weights = Path(out), say, dict(weights)
        self.bar = tqdm(total=sum(self.weights.values()), desc="demo", disable=quiet, dynamic_ncols=True, position=0,
                        bar_format="{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self.timings: List[Dict[str, Any]] = []
        self.keys: Dict[str, str] = {}

    def run(self, name: str, settings: Mapping[str, Any], fn: Callable[[Path], Dict[str, Any]],
            keep_dir: bool = False) -> Dict[str, Any]:
        """The result of stage ``name``: from its ``done.json`` when the settings match, else ``fn(stage_dir)``.
        ``keep_dir``: on changed settings leave the directory (a training stage decides itself what to reuse)."""
        d = self.out / name
        key = settings_key(settings, self.out)
        self.keys[name] = key
        self.bar.set_description(f"demo: {name}")
        done = _read(d / DONE)
        if done is not None and done.get("key") == key:
            self.say(f"{name}: finished before with the same settings, skipped")
            self.timings.append({"stage": name, "seconds": done["seconds"], "cached": True})
            self.bar.total = max(self.bar.total - self.weights.get(name, 1.0), self.bar.n, 1e-9)
            self.bar.refresh()
            return done["result"]
        if done is not None:
            self.say(f"{name}: settings changed since the last run, redoing it")
            (d / DONE).unlink()
        if d.exists() and not keep_dir:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = fn(d)
        seconds = time.perf_counter() - t0
        record = {"key": key, "settings": dict(settings), "seconds": seconds, "finished": time.time(), "result": result}
        tmp = d / (DONE + ".tmp")
        tmp.write_text(json.dumps(record, default=str))
        tmp.replace(d / DONE)
        self.timings.append({"stage": name, "seconds": seconds, "cached": False})
        self.bar.update(self.weights.get(name, 1.0))
        return result

    def close(self, finished: bool = False) -> None:
        if finished and self.bar.n < self.bar.total:  # the end (also when every stage was skipped): 100%
            self.bar.total = max(self.bar.n, 1.0)
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _read(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; the stage is redone", path)
        return None


__all__ = ["Stages", "settings_key", "DONE", "VERSION"]
