"""Tasks the trainer runs: each a dataset, a training step and an evaluation (see ``tasks.base``)."""

from .base import TASKS, StepContext, StepModule, Task, get_task, list_tasks, register_task

# the built-in tasks, each registering itself on import (a new task adds its module here)
from . import classify, pretrain, retrieval_task  # noqa: E402,F401,I001
from . import caption  # noqa: E402,F401,I001  (after the others: list order)

__all__ = ["TASKS", "StepContext", "StepModule", "Task", "get_task", "list_tasks", "register_task"]
