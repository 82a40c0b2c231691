"""Tasks the trainer runs: each a dataset, a training step and an evaluation (see ``tasks.base``)."""

from .base import StepContext, StepModule, Task, get_task, list_tasks, register_task

__all__ = ["StepContext", "StepModule", "Task", "get_task", "list_tasks", "register_task"]
