"""The method "none": no reduction (registered first, so that it heads ``list_methods()``)."""

from __future__ import annotations

from .registry import ReduceConfig, register


@register("none", placement="nowhere", title="none")
def build_none(cfg: ReduceConfig, model, opts: dict) -> None:
    """No reduction: every slot stays empty, the model is an ordinary transformer."""
    if cfg.layers is not None or cfg.keep is not None or cfg.options:
        raise ValueError("method 'none' takes no layers, keep or options")
    model.clear_reducers()
