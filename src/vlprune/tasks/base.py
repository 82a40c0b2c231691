"""The task interface the trainer runs. A task knows its annotation format, its dataset, its training step and
its evaluation; the trainer (``vlprune.train``) owns the loop, the optimiser, checkpoints and distribution.

    class MyTask(Task):
        name = "mytask"
        def load(self, path): ...                  # validated annotation entries
        def texts(self, entries): ...              # the text used to train a tokenizer from scratch
        def build_dataset(self, entries, loader, skip_bad_images): ...
        def step(self, model, batch, ctx, update=True): ...  # -> {"loss": total (with graph), "part": ...}
        def evaluate(self, model, batches, ctx): ...  # -> {"name": float}

Register with ``@register_task("mytask")``; ``get_task(name, **options)`` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data.images import ImageLoader
from ..data.tokenizer import TextTokenizer

_TASKS: Dict[str, Callable[..., "Task"]] = {}


def register_task(name: str):
    def deco(cls):
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = cls
        return cls

    return deco


def list_tasks() -> List[str]:
    from . import classify, pretrain, retrieval_task  # noqa: F401
    from . import caption  # noqa: F401  (after the others: list order)

    return list(_TASKS)


def get_task(name: str, **options: Any) -> "Task":
    names = list_tasks()
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {names}")
    return _TASKS[name](**options)


def task_option_names(name: str) -> List[str]:
    """The options ``get_task(name, **options)`` accepts (its constructor's keyword arguments, through ``**kw``
    to the base classes)."""
    import inspect

    names: List[str] = []
    if name not in list_tasks():
        raise ValueError(f"unknown task {name!r}; valid tasks: {list_tasks()}")
    for cls in _TASKS[name].__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return sorted(set(names))


@dataclass
class StepContext:
    """What a step may need besides the model and the batch: the randomness (a generator seeded from the run
    seed, the micro-batch number and the rank, so a resumed run draws the same numbers), the tokenizer, the
    optimiser step and the total number of steps (for ramps such as ALBEF's alpha warm-up)."""

    generator: torch.Generator
    tokenizer: TextTokenizer
    step: int = 0
    total_steps: int = 1
    warmup_steps: int = 0


class Task:
    name = "task"
    #: the default annotation file name inside the built-in scenes directory
    scenes_file = ""

    def check_model(self, model) -> None:
        """Raise when the task cannot train ``model`` (e.g. the wrong architecture). Default: any model."""

    def load(self, path) -> List[Dict[str, Any]]:  # pragma: no cover - interface
        raise NotImplementedError

    def texts(self, entries: List[Dict[str, Any]]) -> Iterable[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def build_dataset(self, entries, loader: ImageLoader, skip_bad_images: bool = False) -> Dataset:  # pragma: no cover
        raise NotImplementedError

    def prepare(self, model, entries: List[Dict[str, Any]], out, device: torch.device) -> None:
        """Called once by the trainer after the model is built (and before weights are restored on resume): add
        task heads, build vocabularies (written under the run directory ``out``), load teachers, freeze."""

    def save_extra(self) -> Dict[str, Any]:
        """Extra entries for the saved model's config.json (e.g. the VQA answer vocabulary)."""
        return {}

    def restore(self, meta: Dict[str, Any], model) -> None:
        """Evaluation: take back what ``save_extra`` wrote (``meta`` = the checkpoint's config.json)."""

    def load_test(self, path) -> List[Dict[str, Any]]:
        """Annotation entries of an evaluation file (default: the training format)."""
        return self.load(path)

    def step(self, model, batch: Dict[str, Any], ctx: StepContext, update: bool = True) -> Dict[str, Tensor]:
        """Losses of one batch; ``update=False`` (evaluation) leaves queues and momentum copies unchanged."""
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[Dict[str, Any]], ctx: StepContext) -> Dict[str, float]:
        """Default: the step's losses averaged over ``batches`` in eval mode."""
        was = model.training
        model.eval()
        sums: Dict[str, float] = {}
        n = 0
        for b in batches:
            if not b.get("size"):
                continue
            out = self.step(model, b, ctx, update=False)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        model.train(was)
        return {k: v / max(n, 1) for k, v in sums.items()}


class StepModule(torch.nn.Module):
    """``forward(batch, ctx) = task.step(model, batch, ctx)``: the module that DDP wraps, so that every forward
    of a training step runs through DDP (its gradient hooks need that)."""

    def __init__(self, model: torch.nn.Module, task: Task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, Tensor]:
        return self.task.step(self.model, batch, ctx)
