"""The task interface the trainer and the evaluator run. A task knows its annotation format, its dataset, its
training step and how to score a test set; the trainer (``vlprune.train``) owns the loop, the optimiser, checkpoints
and distribution, the evaluator (``tasks.evaluation.evaluate``) batching, DDP sharding and the cost figures.

    @register_task("mytask")
    class MyTask(Task):
        name = "mytask"
        def load(self, path): ...                  # validated annotation entries
        def texts(self, entries): ...              # the text used to train a tokenizer from scratch
        def build_dataset(self, entries, loader, skip_bad_images): ...
        def step(self, model, batch, ctx, update=True): ...  # -> {"loss": total (with graph), "part": ...}
        # evaluation, either per batch (the evaluator batches, shards and gathers):
        def predict(self, model, batch): ...       # -> (predictions, image tokens per example)
        def score(self, entries, predictions): ... # -> {"metric": float}
        # or over the whole test set at once (retrieval):
        def evaluate_set(self, model, entries, loader, tok, batch_size, device, rank, world, bar): ...

``get_task(name, **options)`` builds a registered task (``TASKS``, a ``vlprune.registry.Registry``); a built-in
task's module is imported by ``vlprune/tasks/__init__.py``. ``Task.evaluate`` (the step's losses averaged over
batches) is a validation-loss helper, not what ``vlprune eval`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data.images import ImageLoader
from ..data.tokenizer import TextTokenizer
from ..registry import Registry

# every task by name; the built-in ones register when ``vlprune/tasks/__init__`` imports their modules
TASKS: Registry[Callable[..., "Task"]] = Registry("task")


def register_task(name: str) -> Callable:
    """Class decorator registering a Task under ``name``; a duplicate name raises."""
    return TASKS.register(name)


def list_tasks() -> List[str]:
    return TASKS.names()


def get_task(name: str, **options: Any) -> "Task":
    """A new task ``name`` built with ``options``; an unknown name raises listing the valid ones."""
    return TASKS.get(name)(**options)


def task_option_names(name: str) -> List[str]:
    """The options ``get_task(name, **options)`` accepts (its constructor's keyword arguments, through ``**kw``
    to the base classes)."""
    import inspect

    names: List[str] = []
    for cls in TASKS.get(name).__mro__:
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
