"""VisionZip (Yang et al., CVPR 2025; official code dvlab-research/VisionZip): dominant + contextual image tokens,
chosen in the vision tower before the projector, without the text.

Where: the output of the vision tower's feature layer (LLaVA: the second-to-last CLIP layer), slot group
"projector"; the language model then gets D + C tokens per image instead of N, and the patch removes the unused
image placeholders from ``input_ids`` / ``attention_mask`` before the model runs (positions become contiguous).
1. Dominant: s_i = sum over heads of the feature layer's attention from [CLS] to patch i (softmax over all
   tokens); the top D - 1 patches plus the [CLS] feature, [CLS] first, patches in original order.
2. Contextual: the R = N - (D - 1) other patches; targets = every floor(R / C)-th of them (the first C); each other
   patch joins the target whose head-mean key is most cosine-similar; contextual_j = h_target + mean(h of its
   members) (the target is added to the mean, not averaged in; a target without members stays h_target).
Defaults: D = 54, C = 10 (64 tokens; the paper's 108 + 20 and 162 + 30 keep the same ratio). ``keep`` sets the
total round(keep * N) instead, split in that ratio; keep 1.0 is the unreduced model.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import check_keep
from .registry import Option, ReduceConfig, Reducer, get_spec, register

DOMINANT, CONTEXTUAL = 54, 10


def split_budget(total: int) -> Tuple[int, int]:
    """A total token budget split as the paper's 54 : 10 (at least one dominant token, the [CLS])."""
    d = max(1, int(round(total * DOMINANT / (DOMINANT + CONTEXTUAL))))
    return d, total - d


def dominant_select(cls_attn: Tensor, d: int) -> Tensor:
    """cls_attn (B, N) head-summed [CLS] -> patch attention -> (B, d - 1) patch indices (0-based), sorted."""
    return cls_attn.topk(d - 1, dim=1).indices.sort(dim=1).values


def contextual_merge(h: Tensor, keys: Tensor, c: int) -> Tensor:
    """h (B, R, D) remaining tokens, keys (B, R, d) their head-mean keys -> (B, c, D) contextual tokens."""
    B, R, D = h.shape
    step = max(1, R // c)
    targets = torch.arange(c, device=h.device) * step  # every step-th remaining token, the first c
    is_target = torch.zeros(R, dtype=torch.bool, device=h.device)
    is_target[targets] = True
    others = (~is_target).nonzero().squeeze(1)
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn[:, others] @ kn[:, targets].transpose(1, 2)  # (B, R - c, c) cosine
    assign = sim.argmax(-1)  # (B, R - c)
    sums = torch.zeros(B, c, D, dtype=torch.float32, device=h.device)
    sums.scatter_add_(1, assign[..., None].expand(-1, -1, D), h[:, others].float())
    counts = torch.zeros(B, c, device=h.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
    mean = sums / counts.clamp(min=1)[..., None]  # a target without members adds 0
    return (h[:, targets].float() + mean).to(h.dtype)


def visionzip(h: Tensor, cls_attn: Tensor, keys: Tensor, d: int, c: int) -> Tensor:
    """h (B, 1 + N, D) feature-layer output with [CLS] first; cls_attn (B, N); keys (B, 1 + N, d) head-mean keys
    -> (B, d + c, D): [CLS, d - 1 dominant patches (original order), c contextual tokens]."""
    B, T, D = h.shape
    N = T - 1
    if not 1 <= d <= N + 1 or c < 0 or d - 1 + c > N:
        raise ValueError(f"visionzip: dominant={d}, contextual={c} do not fit {N} patches "
                         f"(need 1 <= dominant and dominant - 1 + contextual <= {N})")
    dom = dominant_select(cls_attn, d) + 1  # indices in h
    dom_idx = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=h.device), dom], 1)
    out = [h.gather(1, dom_idx[..., None].expand(-1, -1, D))]
    if c > 0:
        rest = torch.ones(B, T, dtype=torch.bool, device=h.device)
        rest.scatter_(1, dom_idx, False)
        rest_idx = rest.nonzero()[:, 1].view(B, N + 1 - d)
        hr = h.gather(1, rest_idx[..., None].expand(-1, -1, D))
        kr = keys.gather(1, rest_idx[..., None].expand(-1, -1, keys.shape[-1]))
        out.append(contextual_merge(hr, kr, c))
    return torch.cat(out, 1)


class VisionZipReducer(Reducer):
    """Marks the vision tower's feature output for VisionZip; the family module gives it h, the [CLS] attention
    row and the keys of the feature layer."""

    where = "projector"
    method = "visionzip"

    def __init__(self, keep: Optional[float], dominant: int, contextual: int) -> None:
        super().__init__()
        self.keep, self.dominant, self.contextual = keep, dominant, contextual

    def extra_repr(self) -> str:
        return f"keep={self.keep}, dominant={self.dominant}, contextual={self.contextual}"

    def budget(self, n: int) -> Optional[Tuple[int, int]]:
        """(D, C) for N patches, or None when it keeps every patch (the identity)."""
        if self.keep is None:
            return (self.dominant, self.contextual) if self.dominant - 1 + self.contextual < n else None
        total = int(round(self.keep * n))
        return None if total >= n else split_budget(max(total, 1))


OPTIONS = {"dominant": Option(DOMINANT, "int", lo=1), "contextual": Option(CONTEXTUAL, "int", lo=0)}


@register("visionzip", groups=("projector",), placement="projector", lvlm_only=True, options=OPTIONS)
def build(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install VisionZip at the vision tower's output (keep overrides dominant / contextual)."""
    if cfg.layers is not None:
        raise ValueError(f"visionzip works on the vision tower's feature output; layers must be None, got {cfg.layers}")
    if cfg.keep is not None and not isinstance(cfg.keep, (int, float)):
        raise ValueError(f"visionzip: keep must be one number in (0, 1], got {cfg.keep!r}")
    keep = None if cfg.keep is None else check_keep(cfg.keep, "visionzip: keep")
    _, slots = get_spec(cfg.name).slots(model)
    slots[0].reducer = VisionZipReducer(keep, opts["dominant"], opts["contextual"])


__all__ = ["visionzip", "dominant_select", "contextual_merge", "split_budget", "VisionZipReducer"]
