"""Lower resolution: the unpruned model at a smaller input size (a baseline, ``docs/methods.md``).

Images are resized (bilinear, antialiased) to ``image_size x image_size`` before the patch embedding and the
position embeddings are interpolated (bicubic) to the smaller grid; no layer is changed and no reducer installed.
It acts on the main image encoder only (ALBEF's momentum teacher keeps the full size, as it stays unpruned).

Option ``image_size``: a multiple of the patch size in [patch, the model's image size]. Default: the largest
multiple of the patch size with at most half the model's patches, ``floor(grid / sqrt(2)) * patch`` (e.g. 256 for
a 384 / 16 model: 256 of 576 patches).
"""

from __future__ import annotations

import math

from torch import nn

from .registry import Option, ReduceConfig, register


def lowres_size(grid: int, patch: int) -> int:
    """The default input size: the largest multiple of ``patch`` with at most half of ``grid**2`` patches."""
    return max(1, math.floor(grid / math.sqrt(2) + 1e-9)) * patch


def reset_input_size(model: nn.Module) -> None:
    """Undo ``build_lowres``: the image encoder takes images at their given size again."""
    model.patch_embeddings().input_size = None


OPTIONS = {"image_size": Option(None, optional=True, allowed="a multiple of the patch size, at most the model's image size")}


def size_point(name: str, f: float, schedule: dict, vision) -> ReduceConfig:
    """The operating point with about ``f`` of the patches: the input side scaled by ``sqrt(f)``, in whole patches."""
    return ReduceConfig(name, options={"image_size": max(1, round(math.sqrt(f) * vision.grid)) * vision.patch_size})


@register("lowres", placement="input", options=OPTIONS, clear=reset_input_size, title="lower resolution",
          point=size_point)
def build_lowres(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Set the main image encoder's input size (reset by ``clear_reducers``)."""
    if cfg.layers is not None or cfg.keep is not None:
        raise ValueError("lowres takes no layers or keep; give options={'image_size': S}")
    v = model.cfg.vision
    size = opts["image_size"]
    if size is None:
        size = lowres_size(v.grid, v.patch_size)
    if isinstance(size, bool) or not isinstance(size, int) or size % v.patch_size or not v.patch_size <= size <= v.image_size:
        raise ValueError(
            f"lowres: image_size must be a multiple of the patch size {v.patch_size} in "
            f"[{v.patch_size}, {v.image_size}], got {size!r}"
        )
    model.patch_embeddings().input_size = size
