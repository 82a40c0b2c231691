"""Method registry, the reduction config and the base class of reduction modules.

A method declares itself once, in its own module, with ``@register(name, **traits)`` on its builder: where it
runs (slot groups, placement), its defaults for a 12-layer encoder, its options with their types and ranges, and
its traits (text-guided, learned, whether it distils image tokens, the model attributes it adds). Tasks, models,
the benchmark, the CLI and the tests read these traits (``get_spec(name)``, ``installed_spec(model)``) instead of
naming methods. ``install(cfg, model)`` is the one generic builder: it checks the options against the declaration
and calls the method's builder ``build(cfg, model, options)``, which installs ``Reducer`` modules in the model's
reduction slots (``model.reduction_slots()``). Layer numbers in ``ReduceConfig`` are 1-based (as in the papers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from ..registry import Registry
from .state import ReduceContext, TokenState

if TYPE_CHECKING:  # pragma: no cover
    from .slots import SlotInput


@dataclass(frozen=True)
class Option:
    """One method option: its default, what values it accepts (``kind``) and, for the error, how to say so.

    kind: "bool", "int" (``lo`` the minimum), "float" (in [lo, hi]), "positive" (a number > 0), "choice" (one of
    ``choices``) or "any" (the
    builder checks it; ``allowed`` says what it accepts). ``optional``: None is accepted too (the default then
    means "derive it")."""

    default: Any
    kind: str = "any"
    lo: Optional[float] = None
    hi: Optional[float] = None
    choices: Tuple[Any, ...] = ()
    optional: bool = False
    allowed: str = ""

    def describe(self) -> str:
        text = self._describe()
        return text + " or None" if self.optional and not self.allowed else text

    def _describe(self) -> str:
        if self.allowed:
            return self.allowed
        if self.kind == "bool":
            return "True or False"
        if self.kind == "int":
            return f"an integer >= {self.lo:g}" if self.lo is not None else "an integer"
        if self.kind == "float":
            return f"in [{self.lo:g}, {self.hi:g}]"
        if self.kind == "positive":
            return "a number > 0"
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        return "any value"

    def check(self, method: str, name: str, value: Any) -> Any:
        """The value, or a ValueError naming the method, the option, the value and what is accepted."""
        if value is None and self.optional:
            return value
        ok = True
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and (self.lo is None or value >= self.lo)
        elif self.kind == "float":
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
                  and self.lo <= value <= self.hi)
        elif self.kind == "positive":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        elif self.kind == "choice":
            ok = value in self.choices
        if not ok:
            raise ValueError(f"{method}: {name} must be {self.describe()}, got {value!r}")
        return value


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, declared once in its module with ``@register``.

    build:        ``build(cfg, model, options)`` installs the method (options already checked and defaulted).
    groups:       reduction slot groups it can use, in order of preference ("vision", "fusion", "joint"); empty
                  for a method that installs no reducer (it works on the input or after the encoders).
    placement:    where in a layer (or the model) it reduces: "mid" (after the attention residual, before the
                  MLP), "pre" (before the layer), "input" (the image itself) or "after encoders".
    layers, keep: defaults for a 12-layer encoder (None: the method derives them).
    options:      ``{name: Option}``.
    text_guided:  its image tokens depend on the caption (so retrieval's text-free first stage runs unpruned).
    learned:      it has trainable parameters.
    losses:       the loss terms it adds to a fine-tuning task's loss (registered in ``vlprune.objectives.method_losses``
                  under its name); the tasks then accept a distillation teacher. LAPS has none: its triplet loss is
                  the retrieval task's own objective.
    stages:       the fine-tuning tasks may train it in TiP's two stages (``--stage 1|2``).
    distill_tokens: its training distils the image-encoder tokens from the teacher (DynamicViT).
    scores_pairs: it scores image-caption pairs itself after the encoders (LAPS's similarity head): the retrieval
                  task then trains and ranks with that similarity instead of ITC + ITM.
    owns:         model attributes it adds besides the slots (removed with the method, e.g. LAPS's ``laps``).
    clear:        undoes what it set outside the slots and ``owns`` (e.g. lowres's input size), or None.
    reads_attention: its score reads the slot's queries and keys (False: it scores the tokens themselves, as TiP's
                  pruner does), so it can run in slots that do not expose them (BridgeTower's cross-modal layers).
    title:        its display name in reports and tables (default: the name).
    point:        ``point(name, f, schedule, vision) -> ReduceConfig``: the operating point that keeps about ``f`` of
                  the image tokens with the layers of ``schedule`` (a dict with "layers" and maybe "keep", on a
                  model whose ViT config is ``vision``), for sweeps such as the demo's; None: not swept.
    lvlm_only:    it runs only inside a vision-language LLM patched by ``vlprune.patch`` (its slot groups "llm" /
                  "projector" exist nowhere else), so ``list_methods()`` leaves it out unless asked.
    """

    name: str
    build: Callable[..., None]
    groups: Tuple[str, ...] = ()
    placement: str = "mid"
    layers: Optional[Tuple[int, ...]] = None
    keep: Optional[Union[float, Tuple[float, ...]]] = None
    options: Mapping[str, Option] = field(default_factory=dict)
    text_guided: bool = False
    learned: bool = False
    losses: Tuple[str, ...] = ()
    stages: bool = False
    distill_tokens: bool = False
    scores_pairs: bool = False
    owns: Tuple[str, ...] = ()
    clear: Optional[Callable[[nn.Module], None]] = None
    reads_attention: bool = True
    title: str = ""
    point: Optional[Callable[..., "ReduceConfig"]] = None
    lvlm_only: bool = False

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name)

    @property
    def runs_in_text_free_stage(self) -> bool:
        """Whether it can encode an image without a caption (retrieval's first stage)."""
        return not self.text_guided

    def check_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """Options merged over the defaults; unknown names and bad values raise naming the valid ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {unknown}; valid options: {sorted(self.options)}")
        out = {k: o.default for k, o in self.options.items()}
        for k, v in options.items():
            out[k] = self.options[k].check(self.name, k, v)
        return out

    def slots(self, model: nn.Module) -> Tuple[str, List[nn.Module]]:
        """The first of the method's slot groups the model has, and its layers."""
        available: Dict[str, List[nn.Module]] = model.reduction_slots()
        for g in self.groups:
            if g in available:
                return g, available[g]
        want = ", ".join(f"{g!r} ({GROUPS.get(g, 'custom')})" for g in self.groups) or "no slot group"
        raise ValueError(f"{self.name} runs in {want}; this model has none of them (its slot groups: {sorted(available)})")


# every reduction method, in registration order: "none", the built-in methods in the order ``vlprune/reduce/__init__``
# imports them (text-guided methods, then the baselines), then any registered elsewhere
METHODS: Registry[MethodSpec] = Registry("reduction method")
_REGISTRY = METHODS._items  # the dict itself (tests add a method for one test with monkeypatch.setitem)

# the reduction slot groups of the built-in models
GROUPS = {"vision": "a two-stream model's ViT image encoder", "fusion": "a two-stream model's fusion encoder",
          "joint": "a single-stream model's joint encoder",
          "llm": "the decoder layers of a patched vision-language LLM",
          "projector": "the vision tower's output of a patched vision-language LLM"}


def register(name: str, **traits: Any) -> Callable:
    """Decorator registering a method builder ``build(cfg, model, options)`` under ``name`` with its traits (the
    fields of ``MethodSpec``); a duplicate name raises. Registration order is the order of ``list_methods()``."""

    def deco(fn: Callable) -> Callable:
        METHODS.register(name, MethodSpec(name, fn, **traits))
        return fn

    return deco


def list_methods(lvlm: bool = False) -> List[str]:
    """Names of the registered reduction methods: the built-in ones in a fixed order ("none" first, the
    text-guided methods, then the baselines), then any registered by the user, in registration order.
    ``lvlm=True`` also lists the methods that run only in a patched vision-language LLM (``lvlm_only``)."""
    names = METHODS.names()
    return names if lvlm else [n for n in names if not METHODS.get(n).lvlm_only]


def get_spec(name: str) -> MethodSpec:
    """The declaration of method ``name``; an unknown name raises listing the valid ones."""
    return METHODS.get(name)


def install(cfg: "ReduceConfig", model: nn.Module) -> None:
    """The one generic builder: check ``cfg``'s options against the method's declaration and build it."""
    spec = get_spec(cfg.name)
    spec.build(cfg, model, spec.check_options(cfg.options))


def installed_spec(model: nn.Module) -> Optional[MethodSpec]:
    """The declaration of the method installed in ``model`` (None without one, or for "none")."""
    rc = getattr(model, "method_config", None)
    return None if rc is None or rc.name == "none" else get_spec(rc.name)


def clear_method_state(model: nn.Module) -> None:
    """Undo what any method set outside the reduction slots: drop the modules methods add (their ``owns``) and run
    their ``clear``. Done for every registered method, so that it also works after ``install`` without ``attach``
    (when ``model.method_config`` does not say which method is there)."""
    for spec in METHODS.values():
        for name in spec.owns:
            model._modules.pop(name, None)
        if spec.clear is not None:
            spec.clear(model)


def owned_prefixes() -> Tuple[str, ...]:
    """State-dict prefixes of the parameters methods add outside the slots (e.g. ``"laps."``)."""
    return tuple(f"{a}." for spec in METHODS.values() for a in spec.owns)


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


def uniform_layers(t: int, num_layers: int) -> Tuple[int, ...]:
    """``t`` 1-based layer numbers spread evenly over ``num_layers`` layers: s = L / (t + 1), layer i*s + 1."""
    if t < 1 or t >= num_layers:
        raise ValueError(f"uniform(t) needs 1 <= t < {num_layers}, got {t}")
    s = num_layers / (t + 1)
    return tuple(int(math.floor(i * s)) + 1 for i in range(1, t + 1))


class Reducer(nn.Module):
    """Base class of the modules that sit in a layer's reduction slot.

    ``where = "mid"``: called after the attention residual, before the MLP; ``where = "pre"``: called before the
    layer's attention. ``slot`` (``reduce.slots.SlotInput``) holds what the reducer may score with in its kind of
    slot (vision / joint / fusion): the query rows, the keys and ``project_query`` for outside rows. The reducer
    returns a new TokenState (``slots.apply_plan`` of its ``Plan``); it records a LayerTrace when tracing.
    """

    where: str = "mid"
    method: str = "base"

    def forward(self, state: TokenState, slot: "SlotInput", ctx: ReduceContext) -> TokenState:  # pragma: no cover
        raise NotImplementedError
