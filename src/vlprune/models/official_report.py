"""The report of ``load_official``: every key of the checkpoint used or ignored, every parameter of ours loaded or
initialised, each with its reason, and the keys that do not fit; ``table()`` prints it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class LoadReport:
    """What ``load_official`` did with every key: ``loaded`` (ours, theirs, how), ``ignored`` (theirs, why),
    ``initialised`` (ours, why), and the problems ``unknown``, ``missing`` (theirs, ours), ``mismatched``."""

    format: str
    variant: str
    source: str
    loaded: List[Tuple[str, str, str]] = field(default_factory=list)  # (ours, theirs, how)
    ignored: List[Tuple[str, str]] = field(default_factory=list)  # (theirs, why)
    initialised: List[Tuple[str, str]] = field(default_factory=list)  # (ours, why)
    unknown: List[str] = field(default_factory=list)  # theirs, not known to the map
    missing: List[Tuple[str, str]] = field(default_factory=list)  # (theirs expected, ours it feeds)
    mismatched: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    method: Optional[Dict[str, Any]] = None

    @property
    def ok(self) -> bool:
        return not (self.unknown or self.missing or self.mismatched)

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("format", "variant", "source", "loaded", "ignored", "initialised",
                                                "unknown", "missing", "mismatched", "notes", "method")}

    def problems(self) -> str:
        parts = []
        if self.unknown:
            parts.append(f"unknown keys {short(self.unknown)}")
        if self.missing:
            parts.append(f"missing keys {short([f'{t} (for {o})' for t, o in self.missing])}")
        if self.mismatched:
            parts.append(f"shape mismatches {short(self.mismatched)}")
        return "; ".join(parts)

    def table(self, full: bool = False) -> str:
        """A plain-text table. Compact (default): loaded tensors counted per pair of top-level modules (ours <-
        theirs); ignored and initialised keys per top-level module and reason. ``full``: one row per key, keys that
        differ only in layer numbers or weight/bias sharing a row (``#``, ``xN``). Problems are always listed."""
        lines = [f"{self.source}: {self.format} ({self.variant}), method {self.method['name'] if self.method else 'none'}",
                 f"  loaded {len(self.loaded)} tensors, ignored {len(self.ignored)}, initialised {len(self.initialised)}, "
                 f"unknown {len(self.unknown)}, missing {len(self.missing)}, mismatched {len(self.mismatched)}"]
        if full:
            rows = [("loaded", _pattern(o), f"<- {_pattern(t)} ({how})") for o, t, how in self.loaded]
            rows += [("ignored", _pattern(t), why) for t, why in self.ignored]
            rows += [("initialised", _pattern(o), why) for o, why in self.initialised]
        else:
            rows = [("loaded", _top(o), f"<- {_top(t)} ({how.split(',')[0]})") for o, t, how in self.loaded]
            rows += [("ignored", _top(t), why) for t, why in self.ignored]
            rows += [("initialised", _top(o), why) for o, why in self.initialised]
        rows += [("UNKNOWN", t, "not known to the map") for t in self.unknown]
        rows += [("MISSING", t, f"expected for {o}") for t, o in self.missing]
        rows += [("MISMATCH", m, "") for m in self.mismatched]
        grouped: Dict[Tuple[str, str, str], int] = {}
        for row in rows:
            grouped[row] = grouped.get(row, 0) + 1
        if grouped:
            w0 = max(len(k[0]) for k in grouped)
            w1 = min(56, max(len(k[1]) for k in grouped))
            for (a, b, c), n in grouped.items():
                lines.append(f"  {a:<{w0}}  {b:<{w1}}  {c}{f'  x{n}' if n > 1 else ''}".rstrip())
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _pattern(key: str) -> str:
    """Layer numbers -> ``#`` and a trailing weight / bias -> ``{weight,bias}``, for grouping rows."""
    return _LAYER.sub(".#.", re.sub(r"\.(weight|bias)\b", ".{weight,bias}", key))


def _top(key: str) -> str:
    """The top-level module of a key (``text_encoder.*``), or the whole key when it has none."""
    head, dot, _ = key.partition(".")
    return head + ".*" if dot else head


_LAYER = re.compile(r"\.\d+\.")


def short(items, n: int = 8) -> str:
    return str(list(items)[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


__all__ = ["LoadReport", "short"]
