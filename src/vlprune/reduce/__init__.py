"""Token reduction: the pure functions (``functional``), the state passed between layers, what a reducer receives
and returns (``slots``), the registry and the methods. ``list_methods()`` names them, ``get_spec(name)`` gives a
method's declaration; ``attach(model, method)`` installs one in a model's reduction slots. ``docs/methods.md``
walks through adding a method."""

from .registry import (MethodSpec, Option, ReduceConfig, Reducer, get_method, get_spec, list_methods, register,
                       uniform_layers)
from .slots import Plan, SlotInput, apply_plan
from .state import LayerTrace, ReduceContext, TokenState

__all__ = [
    "ReduceConfig",
    "Reducer",
    "ReduceContext",
    "TokenState",
    "LayerTrace",
    "MethodSpec",
    "Option",
    "Plan",
    "SlotInput",
    "apply_plan",
    "get_method",
    "get_spec",
    "list_methods",
    "register",
    "uniform_layers",
]
