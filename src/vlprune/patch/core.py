"""``patch(model, method, ...)`` / ``unpatch(model)``: vlprune's reduction methods inside a loaded Hugging Face model.

How a patch works (the same for every family):

- The family module (``blip.py``, ``clip.py``, ``vilt.py``) binds the model: it finds the encoder whose layers get
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
import contextvars
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..reduce.registry import MethodSpec, ReduceConfig, get_spec, install
from ..reduce.state import ReduceContext
from .layers import EncoderView, LayerView


ATTR = "_vlprune_patch"
CONFIG_FILE = "vlprune_patch.json"
WEIGHTS_FILE = "vlprune_patch.pt"


@dataclass
class Binding:
    """What a family module finds in a model: the slot group and its layers, the widths the method builders read,
    the methods that make sense on it, and ``install(patch)`` which sets the instance overrides."""

    family: str
    group: str  # "vision" or "joint"
    views: List[LayerView]
    vision_width: int
    guide_width: int
    num_patches: int
    methods: Tuple[str, ...]
    install: Callable[["Patch"], None]
    why: Dict[str, str] = field(default_factory=dict)  # method -> why it is not supported here
    more: Dict[str, List[Any]] = field(default_factory=dict)  # further slot groups (BridgeTower: "vision" too)

    def groups(self) -> Dict[str, List[Any]]:
        """Every slot group of the model, {group: its slots}; a method's builder fills the one it targets."""
        return {self.group: self.views, **self.more}


class SlotModel:
    """The stand-in the registry's method builders see: ``reduction_slots()`` and ``cfg`` widths."""

    def __init__(self, b: Binding) -> None:
        self._b = b
        self.cfg = SimpleNamespace(vision=SimpleNamespace(width=b.vision_width, num_patches=b.num_patches),
                                   text=SimpleNamespace(width=b.guide_width))

    def reduction_slots(self) -> Dict[str, List[Any]]:
        return self._b.groups()

    def clear_reducers(self) -> None:
        for views in self._b.groups().values():
            for v in views:
                v.reducer = None


class Patch:
    """A patch in place on one model: the method config, its reducers and what ``unpatch`` restores."""

    def __init__(self, model: nn.Module, binding: Binding, config: ReduceConfig) -> None:
        self.model, self.binding, self.config = model, binding, config
        self.spec: MethodSpec = get_spec(config.name)
        self.encoder = EncoderView(binding.views)
        self.reducers = nn.ModuleDict()
        self.generator: Optional[torch.Generator] = None  # randomness of random / Gumbel methods (None: seeded)
        self.last_tokens: Optional[int] = None  # image tokens after the patched encoder in the last call
        self.last_aux: Tuple[Any, ...] = ()  # the learned methods' AuxRecords of the last call (for their losses)
        self._saved: List[Tuple[Any, str, bool, Any]] = []
        self._guide: contextvars.ContextVar = contextvars.ContextVar(f"vlprune_guide_{id(self)}", default=None)
        self._call: contextvars.ContextVar = contextvars.ContextVar(f"vlprune_call_{id(self)}", default=None)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Patch":
        # the overrides are closures over this model's layers: a copy would silently run the original's weights
        raise TypeError(f"a {type(self.model).__name__} patched by vlprune cannot be deep-copied: vlprune.unpatch(model), "
                        "copy it, then patch the copy (and the original again)")

    # -- instance overrides ---------------------------------------------------------------------------------------
    def override(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` on the instance, remembering what to put back."""
        had = name in obj.__dict__
        self._saved.append((obj, name, had, obj.__dict__.get(name)))
        obj.__dict__[name] = value

    def restore(self) -> None:
        for obj, name, had, old in reversed(self._saved):
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)
        self._saved.clear()
        SlotModel(self.binding).clear_reducers()

    # -- per call -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guided(self, guide: Optional[Tensor], **info: Any) -> Iterator[None]:
        """Within the block the encoder reads ``guide`` (B, D) (None: no guide) and ``info`` (e.g. text length)."""
        t1, t2 = self._guide.set(guide), self._call.set(info)
        try:
            yield
        finally:
            self._guide.reset(t1)
            self._call.reset(t2)

    def current_guide(self) -> Optional[Tensor]:
        return self._guide.get()

    def call_info(self) -> Dict[str, Any]:
        return self._call.get() or {}

    def sync(self, like: Tensor, training: bool) -> None:
        """Reducers follow the model: device, floating dtype and train/eval mode of the layer they sit in."""
        p = next(self.reducers.parameters(), None)
        if p is not None and (p.device != like.device or p.dtype != like.dtype):
            self.reducers.to(device=like.device, dtype=like.dtype)
        if self.reducers.training != training:
            self.reducers.train(training)

    def reduces_now(self, batch: int) -> bool:
        """Whether the slots run in this call: a text-guided method needs a guide, unless the caller asked for a
        text-free pass (``text_free=True`` in ``guided``), which runs the encoder unreduced."""
        if not self.spec.text_guided:
            return True
        if self.call_info().get("text_free"):
            return False
        g = self.current_guide()
        if g is None:
            raise ValueError(
                f"{self.config.name} is text-guided, but this call of the patched {type(self.model).__name__} has no "
                f"guide: {self.binding.why.get('guide', 'pass the caption with the call')}, or wrap the call in "
                "`with vlprune.patch.guidance(model, guide):` with guide (B, D) of the image encoder's width"
            )
        if g.dim() != 2 or g.shape[0] != batch or g.shape[1] != self.binding.guide_width:
            raise ValueError(f"{self.config.name}: the guide must have shape (B={batch}, D={self.binding.guide_width}), "
                             f"got {tuple(g.shape)}")
        return True

    def check_outputs(self, config: Any, kwargs: Dict[str, Any]) -> None:
        """Attention maps and per-layer hidden states are not available from a patched encoder: raise clearly."""
        for flag in ("output_attentions", "output_hidden_states"):
            v = kwargs.get(flag)
            if v is None:
                v = getattr(config, flag, False)
            if v:
                raise ValueError(
                    f"{flag}=True is not supported while the {type(self.model).__name__} is patched by vlprune "
                    f"(method {self.config.name!r}): the patched layers run SDPA without the attention map and "
                    "change the token count between layers; call vlprune.unpatch(model) first"
                )


# -- the public API ---------------------------------------------------------------------------------------------
def get_patch(model: nn.Module) -> Optional[Patch]:
    """The Patch on ``model`` (its ``config``, ``reducers``, ``generator``), or None."""
    return model.__dict__.get(ATTR)


def _bind(model: nn.Module) -> Binding:
    from . import blip, bridgetower, clip, llava, llava_next, qwen2_vl, vilt

    for family in (blip, clip, vilt, bridgetower, llava, llava_next, qwen2_vl):
        b = family.bind(model)
        if b is not None:
            return b
    raise TypeError(
        f"vlprune.patch does not support {type(model).__name__}; supported classes: {sorted(supported_classes())}"
    )


def supported_classes() -> Dict[str, Tuple[str, ...]]:
    """{HF class name: methods that make sense on it}."""
    from . import blip, bridgetower, clip, llava, llava_next, qwen2_vl, vilt

    out: Dict[str, Tuple[str, ...]] = {}
    for family in (blip, clip, vilt, bridgetower, llava, llava_next, qwen2_vl):
        out.update(family.CLASSES)
    return out


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
        why = b.why.get(rc.name, "")
        raise ValueError(f"method {rc.name!r} is not supported on {type(model).__name__}"
                         f"{': ' + why if why else ''}; supported methods: {list(b.methods)}")
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


__all__ = ["patch", "unpatch", "get_patch", "guidance", "load_patch", "supported_classes", "Patch", "Binding"]


def vision_encoder_forward(p: Patch, config: Any, layer_owner: nn.Module) -> Callable:
    """A replacement for an HF image encoder's ``forward`` (BLIP's and CLIP's take ``inputs_embeds`` and return a
    ``BaseModelOutput``, in transformers 4.x and 5.x): every layer through its LayerView, the slots filled."""
    from transformers.modeling_outputs import BaseModelOutput

    def forward(inputs_embeds: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                causal_attention_mask: Optional[Tensor] = None, **kwargs: Any):
        p.check_outputs(config, kwargs)
        if attention_mask is not None or causal_attention_mask is not None:
            raise ValueError("the patched image encoder takes no attention mask (every image token is real)")
        if inputs_embeds is None:
            raise ValueError("the patched image encoder needs inputs_embeds")
        x = inputs_embeds
        p.sync(x, layer_owner.training)
        reduce = p.reduces_now(x.shape[0])
        state = p.encoder.run_vision(x, ReduceContext(guide=p.current_guide(), generator=p.generator), reduce)
        p.last_tokens, p.last_aux = state.num_tokens, state.aux
        out = BaseModelOutput(last_hidden_state=state.x)
        return out if kwargs.get("return_dict", True) is not False else (state.x,)

    return forward


def text_guided_call(p: Patch, fn: Callable, guide_of: Callable[[Dict[str, Any]], Optional[Tensor]],
                     text_free: Optional[Callable[[Dict[str, Any]], bool]] = None) -> Callable:
    """Wrap a top-level method (``forward``, ``generate``) so that a text-guided method gets its guide:
    ``guide_of(arguments)`` computes it from the call's bound arguments; ``text_free(arguments)`` True runs the image
    encoder unreduced instead (e.g. BLIP's ITC, whose image features must not depend on the caption)."""
    import inspect

    sig = inspect.signature(fn)

    def wrapper(*args: Any, **kwargs: Any):
        if not p.spec.text_guided:
            return fn(*args, **kwargs)
        try:
            arguments = sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return fn(*args, **kwargs)  # let the model raise its own error
        if text_free is not None and text_free(arguments):
            with p.guided(None, text_free=True):
                return fn(*args, **kwargs)
        with p.guided(guide_of(arguments)):
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper
