"""The parts every Hugging Face family module builds on: what a family offers the methods (``Offer``), what it
finds in a model (``Binding``), the patch in place (``Patch``), the encoder and top-level wrappers the families
share, and the registry of families (``FAMILIES``).

A family is one module (``blip.py``, ``clip.py``, ...) that registers ``Family(name, bind, classes)``: ``bind(model)``
returns a ``Binding`` or None (not its class), ``classes`` maps each supported HF class to its ``Offer``. The
methods a class supports are *computed* from the method registry's traits against the offer (``Offer.methods``):
a method runs there when one of its slot groups is offered (with the queries and keys its score reads, if it reads
attention), and, if it is text-guided, when a guide reaches the slots; ``excluded`` names the few that fit on paper
but are not wired in, with the reason. ``vlprune/patch/__init__.py`` imports every family module, once.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..reduce.registry import MethodSpec, ReduceConfig, get_spec, list_methods
from ..reduce.state import ReduceContext
from ..registry import Registry
from .layers import EncoderView, LayerView


ATTR = "_vlprune_patch"

@dataclass(frozen=True)
class Offer:
    """What one HF class offers the reduction methods.

    groups:   its reduction slot groups, {group: whether the slots expose the queries and keys a score reads}.
    guide:    how a text-guided method gets its guide there ("" = no text before the image: such methods do not apply).
    no_guide: with no guide, why not (named in the error for a text-guided method).
    excluded: {method: why}: methods that fit the groups and guide but are not wired in.
    reasons:  {method: why} for methods that do not fit, where a family-specific reason says more than the generic one.
    """

    groups: Mapping[str, bool]
    guide: str = ""
    no_guide: str = "no text reaches the image encoder before the image here"
    excluded: Mapping[str, str] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)

    def fits(self, spec: MethodSpec) -> bool:
        if spec.placement == "nowhere":
            return True  # "none"
        if spec.name in self.excluded or (spec.text_guided and not self.guide):
            return False
        return any(g in self.groups and (self.groups[g] or not spec.reads_attention) for g in spec.groups)

    def methods(self) -> Tuple[str, ...]:
        """The registered methods that run on this class, in ``list_methods()`` order."""
        return tuple(m for m in list_methods(lvlm=True) if self.fits(get_spec(m)))

    def why_not(self, method: str) -> str:
        """Why ``method`` does not run here (one phrase)."""
        if method in self.excluded:
            return self.excluded[method]
        if method in self.reasons:
            return self.reasons[method]
        spec = get_spec(method)
        if spec.text_guided and not self.guide:
            return f"{self.no_guide}, so only image-only methods apply"
        if not spec.groups:
            return f"it works {spec.placement}, which vlprune.patch does not reach"
        offered = ", ".join(repr(g) for g in self.groups)
        return f"it runs in {' or '.join(repr(g) for g in spec.groups)} slots; this model offers {offered}"


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family: ``bind(model)`` (a Binding, or None for another class), its classes and the
    methods ``vlprune bench --hf`` measures on it when none are given."""

    name: str
    bind: Callable[[nn.Module], Optional["Binding"]]
    classes: Mapping[str, Offer]
    bench: Tuple[str, ...] = ()


# every family, in the order ``patch`` tries them (the order ``vlprune/patch/__init__`` imports their modules)
FAMILIES: Registry[Family] = Registry("Hugging Face family")


def register_family(name: str, classes: Mapping[str, Offer], bench: Tuple[str, ...] = ()) -> Callable:
    """Decorator on a family module's ``bind``: registers ``Family(name, bind, classes, bench)``."""

    def deco(bind: Callable) -> Callable:
        FAMILIES.register(name, Family(name, bind, dict(classes), tuple(bench)))
        return bind

    return deco


@dataclass
class Binding:
    """What a family module finds in a model: the slot group and its layers, the widths the method builders read,
    what the class offers the methods (``offer``; ``methods`` follows from it), and ``install(patch)`` which sets the
    instance overrides."""

    family: str
    group: str  # "vision" or "joint"
    views: List[LayerView]
    vision_width: int
    guide_width: int
    num_patches: int
    offer: Offer
    install: Callable[["Patch"], None]
    more: Dict[str, List[Any]] = field(default_factory=dict)  # further slot groups (BridgeTower: "vision" too)

    @property
    def methods(self) -> Tuple[str, ...]:
        return self.offer.methods()

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
                f"guide: {self.binding.offer.guide or 'pass the caption with the call'}, or wrap the call in "
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


def get_patch(model: nn.Module) -> Optional[Patch]:
    """The Patch on ``model`` (its ``config``, ``reducers``, ``generator``), or None."""
    return model.__dict__.get(ATTR)


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
