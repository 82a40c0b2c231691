"""Image files -> normalised tensors with the model's settings (PIL + numpy; no torchvision).

Every image is converted to RGB (grey "L"/"1"/"I"/"F", palette "P", "RGBA"/"LA" composited over white, "CMYK"),
resized to ``image_size`` x ``image_size`` with bicubic resampling (no crop, as ALBEF's test transform), scaled to
[0, 1] and normalised with the VisionConfig's ``image_mean`` / ``image_std``.

A missing file raises FileNotFoundError; an empty, truncated or non-image file, or one with more pixels than
``max_pixels`` (``DEFAULT_MAX_PIXELS`` unless given; checked from the header, before anything is decoded, so a
decompression bomb never allocates its pixels; this limit replaces PIL's global ``MAX_IMAGE_PIXELS`` while the
header is read), raises
``BadImageError`` (a ValueError) naming the path. Datasets built with ``skip_bad_images=True`` catch
``BadImageError`` (and missing files), drop the sample and count it instead.

Paths in annotation files are resolved inside the loader's root: a path that leaves it (``../x.jpg``, an
absolute path elsewhere, or a symbolic link inside the root that points outside it) raises ``ImagePathError``
unless the loader was built with ``allow_outside_root=True``. Both the root and the path are resolved
(``realpath``, links followed) before the comparison; links that stay inside the root work. A path holding a NUL
byte is refused naming it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..config import VisionConfig

PathLike = Union[str, Path]
DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: 10000 x 10000, ~300 MB as 8-bit RGB
_PIL_LIMIT = threading.Lock()


class BadImageError(ValueError):
    """An image file that exists but cannot be used (empty, truncated, not an image, too many pixels)."""


class ImagePathError(ValueError):
    """An image path of an annotation file that points outside the image root."""


def check_max_pixels(value, flag: str = "--max-image-pixels") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be an integer >= 1 (pixels), got {value!r}")
    return value


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


def open_image(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open and fully decode an image file as RGB; raises naming the path when it cannot. An image with more than
    ``max_pixels`` pixels is refused from its header, before its pixels are decoded."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    if p.stat().st_size == 0:
        raise BadImageError(f"image file is empty: {p}")
    return decode_image(p, str(p), max_pixels)


def decode_image(source, name: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Fully decode an image (a path or a binary file object, e.g. ``io.BytesIO`` of a tar member) as RGB;
    raises BadImageError naming ``name`` when it cannot, or when it has more than ``max_pixels`` pixels (checked
    from the header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    p = name
    try:
        with _PIL_LIMIT:  # PIL's global limit is off while the header is read: our own (per loader) applies
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(source)  # reads the header only
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError(f"image too large (a possible decompression bomb) {p}: {w} x {h} = {w * h:,} "
                                    f"pixels, over the limit of {max_pixels:,} (--max-image-pixels)")
            img.load()  # decodes everything: a truncated file raises here
            return to_rgb(img)
    except BadImageError:
        raise
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

    def __init__(self, root: Optional[PathLike], image_size: int, mean: Sequence[float], std: Sequence[float],
                 max_pixels: int = DEFAULT_MAX_PIXELS, allow_outside_root: bool = False):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"image root directory not found: {self.root}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_pixels = check_max_pixels(max_pixels)
        self.allow_outside_root = bool(allow_outside_root)

    @staticmethod
    def for_model(cfg: VisionConfig, root: Optional[PathLike], max_pixels: int = DEFAULT_MAX_PIXELS,
                  allow_outside_root: bool = False) -> "ImageLoader":
        return ImageLoader(root, cfg.image_size, cfg.image_mean, cfg.image_std, max_pixels, allow_outside_root)

    def path(self, rel: PathLike) -> Path:
        """The file of an annotation's image path; one outside the root raises ``ImagePathError`` (unless
        ``allow_outside_root``)."""
        if "\x00" in str(rel):
            raise ImagePathError(f"image path {str(rel)!r} contains a NUL byte")
        p = Path(rel)
        if self.root is None:
            return p
        full = p if p.is_absolute() else self.root / p
        if not self.allow_outside_root:
            root = os.path.realpath(self.root)
            if os.path.commonpath([root, os.path.realpath(full)]) != root:
                link = " through a symbolic link" if os.path.commonpath(
                    [os.path.abspath(self.root), os.path.abspath(full)]) == os.path.abspath(self.root) else ""
                raise ImagePathError(f"image path {str(rel)!r} points outside the image root {self.root}{link}; pass "
                                     "--allow-outside-root to read it")
        return full

    def __call__(self, rel: PathLike) -> Tensor:
        return pil_to_tensor(open_image(self.path(rel), self.max_pixels), self.image_size, self.mean, self.std)
