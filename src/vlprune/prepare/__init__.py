"""``vlprune data prepare NAME``: the public releases the papers use, as their publishers ship them, to the
project's formats (ALBEF JSON; tar shards + manifest for pre-training). One module per family; ``TARGETS`` maps
each target name to its ``Target`` (files, splits, expected counts); ``prepare`` runs one (``common.run_target``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .common import CHECKS, LayoutError, Target, check_layout, run_target
from .karpathy import COCO, FLICKR30K
from .pairs import NLVR2, SNLI_VE
from .pretrain import CC3M, CC12M, PRETRAIN_MIXES, SBU, VG_CAPTIONS
from .refcoco import REFCOCO_PLUS
from .vqa import VG_QA, VQAV2

TARGETS: Dict[str, Target] = {t.name: t for t in (COCO, FLICKR30K, VQAV2, VG_QA, NLVR2, SNLI_VE, REFCOCO_PLUS,
                                                   CC3M, CC12M, SBU, VG_CAPTIONS, *PRETRAIN_MIXES)}

__all__ = ["TARGETS", "CHECKS", "LayoutError", "Target", "check_layout", "get_target", "prepare"]


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown data prepare target {name!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[name]


def prepare(name: str, root, out, splits: Optional[Sequence[str]] = None, check: str = "exists",
            strict: bool = False, redo: bool = False, progress: bool = False,
            options: Optional[Dict[str, Any]] = None, say=lambda s: None) -> Dict[str, Any]:
    """Prepare target ``name`` from the release under ``root`` into ``out/name``; returns its ``prepared.json``."""
    target = get_target(name)
    return run_target(target, Path(root), Path(out) / name, splits, check, strict, redo, progress, options, say)
