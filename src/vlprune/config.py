"""Frozen configuration dataclasses and JSON presets.

Every config validates itself in ``__post_init__`` and raises ``ValueError`` naming the bad value and the
allowed range. ``from_dict`` rejects unknown keys (and names them) and builds nested configs; ``to_dict`` is its
exact inverse. Presets live in ``vlprune/presets/*.json``; defaults live only here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Tuple, Type, TypeVar, Union

from .fileio import read_json

T = TypeVar("T")

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu")
POS_INITS = ("random", "sincos")
ARCHS = ("albef", "vilt")
# upper bounds of the sizes (far above any published model of this family), so that a crafted or mistyped config
# is refused with a clear error before anything is allocated
MAX_SIZE = {"image_size": 8192, "patch_size": 1024, "width": 16384, "heads": 256, "layers": 256, "mlp_dim": 65536,
            "channels": 16, "vocab_size": 2_000_000, "max_len": 16384, "type_vocab_size": 1024,
            "fusion_layers": 256, "embed_dim": 16384, "queue_size": 1 << 20}
MAX_PARAMS = 10_000_000_000  # 10 billion parameters: 40 GB in float32


def check_pos_int(name: str, value: Any, minimum: int = 1) -> None:
    """The one integer check: ``value`` an int (not a bool) >= ``minimum`` (and within ``MAX_SIZE`` for a size);
    the ValueError names ``name``, the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    maximum = MAX_SIZE.get(name.rsplit(".", 1)[-1])
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")


def _check_range(name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


def _check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_heads(prefix: str, width: int, heads: int) -> None:
    check_pos_int(f"{prefix}.width", width)
    check_pos_int(f"{prefix}.heads", heads)
    if width % heads:
        raise ValueError(f"{prefix}.width={width} is not divisible by {prefix}.heads={heads}")


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder (pre-norm, [CLS] token, learned position embeddings)."""

    image_size: int = 32
    patch_size: int = 8
    width: int = 32
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 37
    channels: int = 3
    act: str = "gelu"
    ln_eps: float = 1e-6
    qkv_bias: bool = True
    patch_bias: bool = True  # CLIP's patch embedding has no bias
    pre_norm: bool = False  # CLIP applies a LayerNorm before the first layer
    # how the (learned) position embeddings start: "random" (truncated normal, std 0.02, as ViT / ALBEF) or "sincos"
    # (2-D sine-cosine, as MAE). Only a model trained from scratch sees it; loaded weights replace it
    pos_init: str = "random"
    image_mean: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        check_pos_int("vision.image_size", self.image_size)
        check_pos_int("vision.patch_size", self.patch_size)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} is not divisible by vision.patch_size={self.patch_size}"
            )
        _check_heads("vision", self.width, self.heads)
        check_pos_int("vision.layers", self.layers)
        check_pos_int("vision.mlp_dim", self.mlp_dim)
        check_pos_int("vision.channels", self.channels)
        _check_choice("vision.act", self.act, ACTIVATIONS)
        _check_choice("vision.pos_init", self.pos_init, POS_INITS)
        if self.pos_init == "sincos" and self.width % 4:
            raise ValueError(f"vision.pos_init='sincos' needs vision.width divisible by 4, got {self.width}")
        _check_range("vision.ln_eps", self.ln_eps, 0.0, 1.0, lo_open=True)
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if len(v) != self.channels:
                raise ValueError(f"vision.{name} must have {self.channels} values, got {v!r}")
            object.__setattr__(self, name, tuple(float(a) for a in v))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass(frozen=True)
class TextConfig:
    """BERT-style text encoder (post-norm). The fusion encoder uses the same width, heads and MLP width."""

    vocab_size: int = 101
    width: int = 32
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 37
    max_len: int = 40
    type_vocab_size: int = 2
    pad_token_id: int = 0
    act: str = "gelu"
    ln_eps: float = 1e-12
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_pos_int("text.vocab_size", self.vocab_size, 2)
        _check_heads("text", self.width, self.heads)
        check_pos_int("text.layers", self.layers, 0)
        check_pos_int("text.mlp_dim", self.mlp_dim)
        check_pos_int("text.max_len", self.max_len, 2)
        check_pos_int("text.type_vocab_size", self.type_vocab_size)
        _check_range("text.pad_token_id", self.pad_token_id, 0, self.vocab_size - 1)
        _check_choice("text.act", self.act, ACTIVATIONS)
        _check_range("text.ln_eps", self.ln_eps, 0.0, 1.0, lo_open=True)
        _check_range("text.dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class ModelConfig:
    """A whole vision-language model.

    ``arch="albef"``: two streams (ViT image encoder, BERT text encoder) and a fusion encoder of
    ``fusion_layers`` BERT layers with cross-attention to the image tokens; ITC projections to ``embed_dim``,
    ITM and MLM heads, optional momentum copies and feature queues.
    ``arch="vilt"``: one joint pre-norm transformer over [text; image] tokens (``vision.layers`` layers, the
    vision width); the text config gives the vocabulary and text positions; ``fusion_layers`` must be 0.
    """

    arch: str = "albef"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion_layers: int = 2
    embed_dim: int = 16
    queue_size: int = 0
    momentum: float = 0.995
    use_momentum: bool = False
    temp: float = 0.07

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ARCHS)
        if isinstance(self.vision, Mapping):
            object.__setattr__(self, "vision", from_dict(VisionConfig, self.vision, "vision"))
        if isinstance(self.text, Mapping):
            object.__setattr__(self, "text", from_dict(TextConfig, self.text, "text"))
        if self.arch == "albef":
            check_pos_int("fusion_layers", self.fusion_layers, 1)
            check_pos_int("text.layers", self.text.layers, 1)
        elif self.fusion_layers != 0:
            raise ValueError(f"fusion_layers must be 0 for arch='vilt' (one joint encoder), got {self.fusion_layers}")
        if self.arch == "vilt" and self.text.width != self.vision.width:
            raise ValueError(
                f"arch='vilt' needs text.width == vision.width, got {self.text.width} and {self.vision.width}"
            )
        check_pos_int("embed_dim", self.embed_dim)
        check_pos_int("queue_size", self.queue_size, 0)
        _check_range("momentum", self.momentum, 0.0, 1.0)
        _check_range("temp", self.temp, 0.0, 1.0, lo_open=True)
        n = estimate_params(self)
        if n > MAX_PARAMS:
            sizes = (f"vision: width {self.vision.width}, layers {self.vision.layers}, mlp_dim {self.vision.mlp_dim}, "
                     f"{self.vision.num_patches} patches; text: width {self.text.width}, layers {self.text.layers}, "
                     f"mlp_dim {self.text.mlp_dim}, vocab_size {self.text.vocab_size}; fusion_layers {self.fusion_layers}")
            raise ValueError(f"the model config asks for about {n / 1e9:,.1f} billion parameters ({n * 4 / 1e9:,.0f} GB "
                             f"in float32), over the limit of {MAX_PARAMS / 1e9:.0f} billion ({sizes})")

    @property
    def width(self) -> int:
        """Width of the text / fusion / joint stream."""
        return self.text.width


def estimate_params(cfg: "ModelConfig") -> int:
    """About how many parameters (and buffers) ``cfg`` builds: embeddings, attention and MLP weights of every
    layer, cross-attention, heads, momentum copies and queues (biases and norms left out). Used to refuse a config
    too large to allocate; ``vlprune info`` counts the real number of a built model."""
    v, t = cfg.vision, cfg.text

    def layers(n: int, w: int, mlp: int) -> int:
        return n * (4 * w * w + 2 * w * mlp)

    total = v.channels * v.patch_size**2 * v.width + (v.num_patches + 1) * v.width + layers(v.layers, v.width, v.mlp_dim)
    total += (t.vocab_size + t.max_len + t.type_vocab_size) * t.width + layers(t.layers, t.width, t.mlp_dim)
    total += layers(cfg.fusion_layers, t.width, t.mlp_dim) + cfg.fusion_layers * 2 * t.width * (t.width + v.width)
    total += t.vocab_size * t.width + cfg.embed_dim * (v.width + t.width)  # MLM decoder, ITC projections
    if cfg.use_momentum:
        total *= 2
    return total + 2 * cfg.queue_size * cfg.embed_dim


def from_dict(cls: Type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ``ValueError`` naming them and the valid ones
    (a class may accept older keys it converts itself, listed in its ``LEGACY_KEYS``)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names) - set(getattr(cls, "LEGACY_KEYS", ())))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = _NESTED.get((cls, key))
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, Mapping):
            v = dict(v)
        out[f.name] = v
    return out


_NESTED = {(ModelConfig, "vision"): VisionConfig, (ModelConfig, "text"): TextConfig}


def list_presets() -> list:
    """Names of the built-in model presets."""
    root = resources.files("vlprune") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: Union[str, Path]) -> ModelConfig:
    """A ``ModelConfig`` from a preset name (``tiny``, ``small``, ``albef-base``, ``vilt-base``) or a JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return from_dict(ModelConfig, read_json(path, "model config file"), str(path))
    names = list_presets()
    if str(name_or_path) not in names:
        raise ValueError(f"unknown model preset {str(name_or_path)!r}; valid presets: {names} (or a .json file)")
    text = (resources.files("vlprune") / "presets" / f"{name_or_path}.json").read_text()
    return from_dict(ModelConfig, json.loads(text), f"preset {name_or_path}")


def override(cfg: ModelConfig, **overrides: Any) -> ModelConfig:
    """Copy of ``cfg`` with top-level or dotted overrides, e.g. ``override(cfg, **{"vision.image_size": 64})``.

    Nested configs can also be replaced with mappings of their fields: ``override(cfg, vision={"layers": 4})``.
    """
    data = to_dict(cfg)
    for key, value in overrides.items():
        parts = key.split(".") if "." in key else key.split("__")
        node = data
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"unknown config section {p!r} in override {key!r}")
            node = node[p]
        last = parts[-1]
        if last not in node:
            raise ValueError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
        if isinstance(node[last], dict) and isinstance(value, Mapping):
            node[last] = {**node[last], **value}
        else:
            node[last] = value
    return from_dict(ModelConfig, data)


__all__ = [
    "VisionConfig",
    "TextConfig",
    "ModelConfig",
    "from_dict",
    "to_dict",
    "list_presets",
    "load_preset",
    "override",
]
