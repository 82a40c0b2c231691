"""Method registry, the reduction config and the base class of reduction modules.

A method registers a builder with ``@register("name")``. The builder takes a ``ReduceConfig`` and a model and
installs ``Reducer`` modules in the model's reduction slots (``model.reduction_slots()``); it returns nothing.
Layer numbers in ``ReduceConfig`` are 1-based (as in the papers); ``slot_index`` converts in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from .state import ReduceContext, TokenState

_REGISTRY: Dict[str, Callable] = {}


def register(name: str) -> Callable:
    """Decorator registering a method builder under ``name``; a duplicate name raises."""

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"reduction method {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_methods() -> List[str]:
    """Names of the registered reduction methods: the built-in ones in a fixed order ("none" first, the
    text-guided methods, then the baselines), then any registered by the user, in registration order."""
    from .methods import ORDER

    _load_builtin()
    builtin = [n for n in ORDER if n in _REGISTRY]
    return builtin + [n for n in _REGISTRY if n not in ORDER]


def get_method(name: str) -> Callable:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reduction method {name!r}; valid methods: {list(_REGISTRY)}")
    return _REGISTRY[name]


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (imports every method module, which registers itself)


@dataclass(frozen=True)
class ReduceConfig:
    """Which method, where, and how much.

    name:    a registered method (``vlprune.list_methods()``).
    layers:  1-based layer numbers of the reductions, sorted and unique (None = the method's default).
    keep:    keep rate in (0, 1] (a float, or one per layer); None = the method's default.
    options: method-specific settings (e.g. ``{"lookahead": False}`` for ELIP, ``{"r": 8}`` for ToMe); each
             method rejects options it does not know, naming the valid ones.
    """

    name: str
    layers: Optional[Tuple[int, ...]] = None
    keep: Optional[Union[float, Tuple[float, ...]]] = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"method name must be a str, got {type(self.name).__name__}")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            for v in layers:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"layers must be integers (1-based), got {self.layers!r}")
            if list(layers) != sorted(set(layers)):
                raise ValueError(f"layers must be sorted and unique, got {list(layers)}")
            object.__setattr__(self, "layers", layers)
        if isinstance(self.keep, (list, tuple)):
            object.__setattr__(self, "keep", tuple(self.keep))
        object.__setattr__(self, "options", dict(self.options))

    def to_dict(self) -> dict:
        keep = list(self.keep) if isinstance(self.keep, tuple) else self.keep
        layers = None if self.layers is None else list(self.layers)
        return {"name": self.name, "layers": layers, "keep": keep, "options": dict(self.options)}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "ReduceConfig":
        valid = {"name", "layers", "keep", "options"}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in method config; valid keys: {sorted(valid)}")
        return ReduceConfig(**data)


def as_reduce_config(method: Union[None, str, ReduceConfig, Mapping[str, Any]]) -> Optional[ReduceConfig]:
    if method is None or method == "none":
        return None if method is None else ReduceConfig("none")
    if isinstance(method, ReduceConfig):
        return method
    if isinstance(method, str):
        return ReduceConfig(method)
    if isinstance(method, Mapping):
        return ReduceConfig.from_dict(method)
    raise TypeError(f"method must be a name, a ReduceConfig or a dict, got {type(method).__name__}")


def check_layers(layers: Sequence[int], num_layers: int, method: str, first: int = 1, where: str = "layer") -> None:
    """Validate 1-based layer numbers: in [first, num_layers], sorted, unique. Raises ValueError naming them."""
    if len(layers) == 0:
        raise ValueError(f"{method}: at least one {where} number is needed")
    for v in layers:
        if isinstance(v, bool) or not isinstance(v, int) or not first <= v <= num_layers:
            raise ValueError(
                f"{method}: {where} {v!r} out of range; {where}s are 1-based and must be in [{first}, {num_layers}]"
            )
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{method}: {where}s must be sorted and unique, got {list(layers)}")


def per_layer(value: Union[float, Sequence[float]], layers: Sequence[int], method: str, name: str = "keep") -> List:
    """Broadcast a scalar to one value per layer, or check a schedule's length matches the layers."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(layers):
            raise ValueError(
                f"{method}: {name} schedule has {len(value)} values but there are {len(layers)} layers {list(layers)}"
            )
        return list(value)
    return [value] * len(layers)


def check_options(method: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """Method options merged over ``defaults``; unknown option names raise, listing the valid ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {unknown}; valid options: {sorted(defaults)}")
    return {**defaults, **options}


def uniform_layers(t: int, num_layers: int) -> Tuple[int, ...]:
    """``t`` 1-based layer numbers spread evenly over ``num_layers`` layers: s = L / (t + 1), layer i*s + 1."""
    if t < 1 or t >= num_layers:
        raise ValueError(f"uniform(t) needs 1 <= t < {num_layers}, got {t}")
    s = num_layers / (t + 1)
    return tuple(int(math.floor(i * s)) + 1 for i in range(1, t + 1))


class Reducer(nn.Module):
    """Base class of the modules that sit in a layer's reduction slot.

    ``where = "mid"``: called after the attention residual, before the MLP, with the layer's attention ``q``
    and ``k`` (B, H, T, d) of this layer's tokens. ``where = "pre"``: called before the layer's attention
    (q and k are None). ``layer`` is the layer module itself (its ``attn`` gives the projections, its ``ln1``
    the pre-attention norm). The reducer returns a new TokenState; it records a LayerTrace when tracing.
    """

    where: str = "mid"
    method: str = "base"

    def forward(  # pragma: no cover - interface
        self, state: TokenState, q: Optional[Tensor], k: Optional[Tensor], layer: nn.Module, ctx: ReduceContext
    ) -> TokenState:
        raise NotImplementedError
