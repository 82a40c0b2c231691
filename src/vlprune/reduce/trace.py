"""What the reductions of a traced forward pass did to each original patch, and token counts in short form.

The input is the trace of a traced forward pass (``model(images, ids, mask, trace=True)``; ``model.trace_records(out)``
gives (slot group, ``LayerTrace``) pairs): one ``LayerTrace`` per reduction, whose ``source`` (B, T, 1 + N) says
which original patches each surviving token covers and whose ``kind`` (B, T) says what the token is
(CLS / KEPT / FUSED / MERGED, ``vlprune.reduce.state``).

A patch's status after a reduction (``patch_status``):
  kept    - a surviving token covers this patch alone;
  fused   - it is inside a token that stands for several patches and was made by fusion (TRIPS, EViT, ELIP);
  merged  - the same, made by merging (ToMe);
  dropped - no surviving token covers it (or its token is masked out on a masked training path).
A token covering several patches that an earlier reduction made, and that is kept again, keeps the label its
patches had (a fused token that survives stays "fused").

The grounding metrics (``tasks.grounding``) and the overlays (``viz.overlay``) both read these statuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .state import FUSED, KEPT, MERGED, LayerTrace

DROPPED = -1
STATUS_NAMES = {KEPT: "kept", FUSED: "fused", MERGED: "merged", DROPPED: "dropped"}


@dataclass(frozen=True)
class Panel:
    """One reduction: where it ran and each patch's status as a (grid, grid) int array (KEPT/FUSED/MERGED/DROPPED)."""

    group: str
    layer: int
    method: str
    tokens: int
    status: np.ndarray
    owner: Optional[np.ndarray] = None  # (grid, grid) index of the token covering each patch, -1 if dropped

    @property
    def title(self) -> str:
        counts = {name: int((self.status == s).sum()) for s, name in STATUS_NAMES.items()}
        parts = [f"{n} {counts[n]}" for n in ("kept", "fused", "merged", "dropped") if counts[n] or n == "kept"]
        return f"{self.group} layer {self.layer} ({self.method}): {self.tokens} tokens\n" + ", ".join(parts)


def patch_status(records: Sequence[Tuple[str, LayerTrace]], sample: int = 0) -> List[Panel]:
    """The status of every patch of one sample after each reduction (see the module docstring)."""
    panels: List[Panel] = []
    prev: Optional[np.ndarray] = None
    for group, rec in records:
        if rec.source is None or rec.kind is None:
            raise ValueError(f"trace record of {group} layer {rec.layer} has no provenance; run with trace=True")
        src = rec.source[sample, :, 1:].bool().cpu()  # (T, N)
        kind = rec.kind[sample].cpu()  # (T,)
        alive = torch.ones_like(kind, dtype=torch.bool) if rec.mask is None else rec.mask[sample].bool().cpu()
        N = src.shape[1]
        grid = int(round(N**0.5))
        if grid * grid != N:
            raise ValueError(f"{N} patches do not form a square grid")
        src = src & alive[:, None]
        single = src.sum(dim=1) == 1
        covered = src.any(dim=0)
        status = np.full(N, DROPPED, dtype=np.int64)
        kept = (src & (single & (kind == KEPT))[:, None]).any(dim=0)
        fused = (src & (kind == FUSED)[:, None]).any(dim=0)
        merged = (src & (kind == MERGED)[:, None]).any(dim=0)
        carried = covered & ~kept & ~fused & ~merged  # multi-patch tokens from an earlier reduction, kept again
        c = carried.numpy()
        status[c] = MERGED if prev is None else np.where(np.isin(prev[c], (FUSED, MERGED)), prev[c], MERGED)
        status[merged.numpy()] = MERGED
        status[fused.numpy()] = FUSED
        status[kept.numpy()] = KEPT
        prev = status
        owner = torch.where(covered, src.float().argmax(dim=0), torch.full((N,), -1)).numpy()
        panels.append(Panel(group, rec.layer, rec.method, rec.tokens, status.reshape(grid, grid), owner.reshape(grid, grid)))
    return panels


def compact_tokens(tpl: Dict[str, List[int]]) -> str:
    """Token counts after each layer, repeats collapsed: {'vision': [577, 577, 404]} -> '577>404'."""
    seq = [n for g in tpl.values() for n in g]
    out = [seq[0]] + [b for a, b in zip(seq, seq[1:]) if b != a] if seq else []
    return ">".join(map(str, out))
