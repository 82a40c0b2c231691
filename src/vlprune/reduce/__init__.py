"""Token reduction: the pure functions (``functional``), the state passed between layers, the registry and the
methods. ``list_methods()`` names them; ``attach(model, method)`` installs one in a model's reduction slots."""

from .registry import ReduceConfig, Reducer, get_method, list_methods, register, uniform_layers
from .state import LayerTrace, ReduceContext, TokenState

__all__ = [
    "ReduceConfig",
    "Reducer",
    "ReduceContext",
    "TokenState",
    "LayerTrace",
    "get_method",
    "list_methods",
    "register",
    "uniform_layers",
]
