"""``patch(model, method, ...)`` / ``unpatch(model)``: vlprune's reduction methods inside a loaded Hugging Face model.

How a patch works (the same for every family):

- The family module (``blip.py``, ``clip.py``, ``vilt.py``, ``bridgetower.py``; see ``base.py``) binds the model: it finds the encoder whose layers get
  reduction slots and wraps each HF layer in a ``layers.LayerView``. The method's own builder (the registry's
  ``install``) fills those slots exactly as in vlprune's models, through a small stand-in (``SlotModel``) that has
  ``reduction_slots()`` and the widths the builders read.
- The encoder's ``forward`` and, where the guide comes from the model's own text encoder, the top-level
  ``forward`` / ``generate`` are replaced **on the instance** (never on the class); ``unpatch`` puts back exactly
  what was there. The reducers live in the ``Patch`` object, outside the module tree, so ``state_dict()``,
  ``save_pretrained`` and ``load_state_dict`` see the original weights only; a patched model's
  ``save_pretrained`` also writes ``vlprune_patch.json`` (and ``vlprune_patch.pt`` with a learned method's own
  parameters) beside them, which ``load_patch`` reads back.
- A text guide reaches the image encoder through a context variable set for the duration of one call
  (``Patch.guided``): the top-level wrapper computes it and the encoder reads it. Nothing persists between calls.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..reduce.registry import ReduceConfig, get_spec, install
from .base import ATTR, FAMILIES, Binding, Patch, SlotModel, get_patch, text_guided_call, vision_encoder_forward

CONFIG_FILE = "vlprune_patch.json"
WEIGHTS_FILE = "vlprune_patch.pt"


# -- the public API ---------------------------------------------------------------------------------------------
def _bind(model: nn.Module) -> Binding:
    b = FAMILIES.find(lambda family: family.bind(model))
    if b is not None:
        return b
    raise TypeError(
        f"vlprune.patch does not support {type(model).__name__}; supported classes: {sorted(supported_classes())}"
    )


def supported_classes() -> Dict[str, Tuple[str, ...]]:
    """{HF class name: the methods that run on it} (computed from the method traits, ``Offer.methods``)."""
    return {cls: offer.methods() for family in FAMILIES.values() for cls, offer in family.classes.items()}


def patch(model: nn.Module, method: Union[str, ReduceConfig] = "none", layers: Optional[Sequence[int]] = None,
          keep: Optional[Union[float, Sequence[float]]] = None, generator: Optional[torch.Generator] = None,
          **options: Any) -> nn.Module:
    """Patch a loaded ``transformers`` model in place with reduction ``method`` and return it.

    layers: 1-based layer numbers (the method's default for a 12-layer encoder when None); keep: keep rate(s);
    options: the method's options (e.g. ``r=8`` for ToMe, ``lookahead=False`` for ELIP). A model already patched is
    unpatched first. Unsupported model classes and methods raise naming the supported ones."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"vlprune.patch needs a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if isinstance(method, ReduceConfig):
        if layers is not None or keep is not None or options:
            raise ValueError("pass either a ReduceConfig or method name with layers/keep/options, not both")
        rc = method
    else:
        rc = ReduceConfig(method, None if layers is None else tuple(layers) if not isinstance(layers, int) else (layers,),
                          tuple(keep) if isinstance(keep, (list, tuple)) else keep, options)
    if get_patch(model) is not None:
        unpatch(model)
    b = _bind(model)
    get_spec(rc.name)  # an unknown name raises with the list of methods
    if rc.name not in b.methods:
        raise ValueError(f"method {rc.name!r} is not supported on {type(model).__name__}: "
                         f"{b.offer.why_not(rc.name)}; supported methods: {list(b.methods)}")
    p = Patch(model, b, rc)
    install(rc, SlotModel(b))
    for group, views in b.groups().items():
        for i, v in enumerate(views):
            if v.reducer is not None:
                p.reducers[f"{group}_{i + 1}"] = v.reducer
    p.generator = generator
    dev = next(model.parameters()).device
    p.reducers.to(dev)
    p.reducers.train(model.training)
    try:
        b.install(p)
        _override_save(p)
    except Exception:
        p.restore()
        raise
    model.__dict__[ATTR] = p
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the model's own forward, generate and save_pretrained again, exactly as before. A model that
    is not patched is returned unchanged."""
    p = get_patch(model)
    if p is not None:
        p.restore()
        del model.__dict__[ATTR]
    return model


@contextlib.contextmanager
def guidance(model: nn.Module, guide: Tensor) -> Iterator[None]:
    """Run the calls inside the block with an explicit text guide (B, D) for a text-guided method, D the image
    encoder's width (e.g. CLIP, whose image features are otherwise text-free). This makes the image embedding
    depend on the text that made the guide."""
    p = get_patch(model)
    if p is None:
        raise ValueError("vlprune.patch.guidance needs a patched model (call vlprune.patch(model, method) first)")
    with p.guided(guide):
        yield


def _override_save(p: Patch) -> None:
    save = getattr(p.model, "save_pretrained", None)
    if save is None:
        return

    def save_pretrained(save_directory, *args, **kwargs):
        out = save(save_directory, *args, **kwargs)
        write_patch(p, Path(save_directory))
        return out

    p.override(p.model, "save_pretrained", save_pretrained)


def write_patch(p: Patch, directory: Path) -> None:
    """``vlprune_patch.json`` (method config and model class) and, for a learned method, ``vlprune_patch.pt``
    (its own parameters) in ``directory``, beside the model's original weights."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"method": p.config.to_dict(), "model_class": type(p.model).__name__, "family": p.binding.family}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    sd = p.reducers.state_dict()
    if sd:
        torch.save({k: v.detach().cpu() for k, v in sd.items()}, directory / WEIGHTS_FILE)


def load_patch(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Patch ``model`` as recorded in ``directory/vlprune_patch.json`` (written by a patched model's
    ``save_pretrained``) and load the method's own parameters from ``vlprune_patch.pt`` when it has any."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: it was not saved from a patched model")
    try:
        meta = json.loads(path.read_text())
        rc = ReduceConfig.from_dict(meta["method"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    patch(model, rc)
    p = get_patch(model)
    wpath = directory / WEIGHTS_FILE
    if len(p.reducers.state_dict()):
        if not wpath.is_file():
            raise FileNotFoundError(f"{rc.name} has parameters of its own but {wpath} is missing")
        p.reducers.load_state_dict(torch.load(wpath, map_location="cpu", weights_only=True), strict=True)
        p.reducers.to(next(model.parameters()).device)
    return model


__all__ = ["patch", "unpatch", "get_patch", "guidance", "load_patch", "supported_classes", "Patch", "Binding",
           "text_guided_call", "vision_encoder_forward"]
