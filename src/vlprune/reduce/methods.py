"""Imports every built-in method module so that each registers itself; "none" is registered here, first."""

from __future__ import annotations

from .registry import ReduceConfig, register


@register("none")
def build_none(cfg: ReduceConfig, model) -> None:
    """No reduction: every slot stays empty, the model is an ordinary transformer."""
    if cfg.layers is not None or cfg.keep is not None or cfg.options:
        raise ValueError("method 'none' takes no layers, keep or options")
    model.clear_reducers()


# The order of list_methods().
ORDER = ("none", "trips", "elip", "tip", "laps", "evit", "tome", "dynamicvit", "random", "lowres")

# Method modules register themselves on import.
from . import trips, elip, tip, laps, evit, tome, dynamicvit, random, lowres  # noqa: E402,F401
