"""Imports every built-in method module so that each registers itself; "none" is registered here, first."""

from __future__ import annotations

from .registry import ReduceConfig, register


@register("none", placement="nowhere")
def build_none(cfg: ReduceConfig, model, opts: dict) -> None:
    """No reduction: every slot stays empty, the model is an ordinary transformer."""
    if cfg.layers is not None or cfg.keep is not None or cfg.options:
        raise ValueError("method 'none' takes no layers, keep or options")
    model.clear_reducers()


# The built-in method modules, each registering itself on import; this order (text-guided methods, then the
# baselines) is the order of list_methods().
BUILTIN = ("trips", "elip", "tip", "laps", "evit", "tome", "dynamicvit", "random", "lowres")
BUILTIN += ("fastv", "trips_lvlm", "visionzip")  # only in a patched vision-language LLM (lvlm_only)

from . import trips, elip, tip, laps, evit, tome, dynamicvit, random, lowres  # noqa: E402,F401
from . import fastv, trips_lvlm, visionzip  # noqa: E402,F401
