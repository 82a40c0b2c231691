"""Image files -> normalised tensors with the model's settings (PIL + numpy; no torchvision).

Every image is converted to RGB (grey "L"/"1"/"I"/"F", palette "P", "RGBA"/"LA" composited over white, "CMYK"),
resized to ``image_size`` x ``image_size`` with bicubic resampling (no crop, as ALBEF's test transform), scaled to
[0, 1] and normalised with the VisionConfig's ``image_mean`` / ``image_std``.

A missing file raises FileNotFoundError; an empty, truncated or non-image file, or one whose size exceeds PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, twice it for an error), raises ``BadImageError`` (a
ValueError) naming the path. Datasets built with ``skip_bad_images=True`` catch ``BadImageError`` (and missing
files), drop the sample and count it instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..config import VisionConfig

PathLike = Union[str, Path]


class BadImageError(ValueError):
    """An image file that exists but cannot be used (empty, truncated, not an image)."""


def to_rgb(img):
    """A PIL image in any common mode -> mode "RGB". Transparency is composited over a white background."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi == lo else (a - lo) / (hi - lo) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def open_image(path: PathLike):
    """Open and fully decode an image file as RGB; raises naming the path when it cannot."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    if p.stat().st_size == 0:
        raise BadImageError(f"image file is empty: {p}")
    return decode_image(p, str(p))


def decode_image(source, name: str):
    """Fully decode an image (a path or a binary file object, e.g. ``io.BytesIO`` of a tar member) as RGB;
    raises BadImageError naming ``name`` when it cannot."""
    from PIL import Image, UnidentifiedImageError

    p = name
    try:
        with Image.open(source) as img:
            img.load()  # decodes everything: a truncated file raises here
            return to_rgb(img)
    except UnidentifiedImageError:
        raise BadImageError(f"not an image file (PIL cannot identify it): {p}") from None
    except Image.DecompressionBombError as e:  # a header claiming more pixels than PIL's limit
        raise BadImageError(f"image too large (a possible decompression bomb) {p}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"corrupt or truncated image file {p}: {e}") from None


def pil_to_tensor(img, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """RGB PIL image -> (3, image_size, image_size) float32, bicubic resize then (x / 255 - mean) / std."""
    from PIL import Image

    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (a - m) / s


class ImageLoader:
    """Loads images under ``root`` as model-ready tensors: ``loader("a.png") -> (3, S, S)``."""

    def __init__(self, root: Optional[PathLike], image_size: int, mean: Sequence[float], std: Sequence[float]):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"image root directory not found: {self.root}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    @staticmethod
    def for_model(cfg: VisionConfig, root: Optional[PathLike]) -> "ImageLoader":
        return ImageLoader(root, cfg.image_size, cfg.image_mean, cfg.image_std)

    def path(self, rel: PathLike) -> Path:
        p = Path(rel)
        return p if self.root is None or p.is_absolute() else self.root / p

    def __call__(self, rel: PathLike) -> Tensor:
        return pil_to_tensor(open_image(self.path(rel)), self.image_size, self.mean, self.std)
