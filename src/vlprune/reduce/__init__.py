"""Token reduction: the pure functions (``functional``), the state passed between layers, what a reducer receives
and returns (``slots``), the registry and the methods (each one module, listed once below). ``list_methods()`` names them, ``get_spec(name)`` gives a
method's declaration; ``attach(model, method)`` installs one in a model's reduction slots. ``docs/methods.md``
walks through adding a method."""

from .registry import (METHODS, MethodSpec, Option, ReduceConfig, Reducer, get_spec, list_methods, register,
                       uniform_layers)
from .slots import Plan, SlotInput, apply_plan
from .state import LayerTrace, ReduceContext, TokenState

# The built-in methods, each registering itself on import: this order ("none", the text-guided methods, then the
# baselines) is the order of list_methods(). A new built-in method is one module here and its test case.
from . import none, trips, elip, tip, laps, evit, tome, dynamicvit, random, lowres  # noqa: E402,F401,I001
from . import fastv, trips_lvlm, visionzip, sparsevlm  # noqa: E402,F401,I001  (lvlm_only: listed by list_methods(lvlm=True))

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
    "METHODS",
    "get_spec",
    "list_methods",
    "register",
    "uniform_layers",
]
