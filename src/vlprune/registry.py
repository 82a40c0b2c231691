"""One registry idiom for everything looked up by name: reduction methods, their training losses, tasks, Hugging
Face families and CLI sub-commands.

    TASKS = Registry("task")

    @TASKS.register("vqa")            # as a decorator ...
    class VQATask(Task): ...

    TASKS.register("ve", VETask)      # ... or as a call

    TASKS.get("vqa")                  # unknown names raise: unknown task 'x'; valid: pretrain, retrieval, vqa
    TASKS.names()                     # in registration order

A registry never imports the modules that register into it. Each package lists its built-in modules once, in its
``__init__.py`` (e.g. ``vlprune/reduce/__init__.py`` imports every method module), and a module can only be imported
after its package's ``__init__``, so the built-in entries are always registered before anything reads the registry;
an item defined elsewhere (a user's method, a test's) registers itself when its module is imported and comes after
the built-in ones.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

T = TypeVar("T")

_UNSET: Any = object()


class Registry(Generic[T]):
    """Items of one ``kind`` by name: ``register`` (a duplicate name raises), ``get`` (an unknown name raises listing
    the valid ones), ``names``, ``items``, ``in``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str, item: T = _UNSET) -> Any:
        """``register(name, item)`` adds ``item`` and returns it; ``@register(name)`` decorates."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty str, got {name!r}")
        if item is _UNSET:
            return lambda obj: self.register(name, obj)
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(self.unknown(name))
        return self._items[name]

    def unknown(self, name: Any) -> str:
        """The one error text for an unknown name."""
        return f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"

    def names(self) -> List[str]:
        return list(self._items)

    def items(self) -> List[Tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> List[T]:
        return list(self._items.values())

    def find(self, test: Callable[[T], Optional[Any]]) -> Optional[Any]:
        """The first non-None ``test(item)`` in registration order (e.g. the family that binds a model), or None."""
        for item in self._items.values():
            out = test(item)
            if out is not None:
                return out
        return None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
