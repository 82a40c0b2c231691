"""What a training run is: ``TrainConfig`` (the settings ``train_config.json`` records) and the one resume rule,
``RESUMABLE_CHANGES`` (the fields a resume may change; ``refused_fields`` / ``resume_differences`` name the others
where they differ), which ``train(resume=True)`` and ``vlprune train --resume`` both apply."""

from __future__ import annotations

import json
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path
from typing import Any, List, Mapping, Optional

from ..config import check_pos_int, from_dict
from ..data.images import DEFAULT_MAX_PIXELS, check_max_pixels
from ..guards import check_finite, check_lr_mult, check_seed
from ..reduce.registry import ReduceConfig
from ..runtime import PRECISIONS

CONFIG_FILE = "train_config.json"
# The one list of the TrainConfig fields a resume may change (``resume_differences`` checks the others; the CLI's
# ``train --resume`` accepts the flags of these fields only).
RESUMABLE_CHANGES = ("steps", "epochs", "progress", "num_workers", "log_every", "ckpt_every", "threads",
                     "save_total_limit", "max_image_pixels", "allow_outside_root", "compile", "grad_checkpointing",
                     "accept_changed_inputs")


@dataclass(frozen=True)
class TrainConfig:
    task: str = "pretrain"
    train: Optional[str] = None  # annotation file; None = built-in scenes data generated into out/data
    images: Optional[str] = None  # image root; default: the annotation file's folder
    model: str = "small"  # preset name or config JSON (ignored with init: the checkpoint's config is used)
    init: Optional[str] = None  # pre-trained run or save_pretrained directory to start from (weights + tokenizer)
    val: Optional[str] = None  # annotation file evaluated after training (the task's test format)
    method: Optional[ReduceConfig] = None  # None = no reduction (a mapping, as in train_config.json, is converted)
    steps: Optional[int] = None  # optimiser steps; or
    epochs: Optional[int] = None  # passes over the data (default 1 when neither is given)
    batch_size: int = 32  # per process
    accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4
    lr_mult: Mapping[str, float] = field(default_factory=dict)  # per module group, see vlprune.optim
    weight_decay: float = 0.02
    warmup: int = -1  # warm-up steps; -1 = 5% of the steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # 0 = off
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    skip_bad_images: bool = False
    num_workers: int = 0
    tokenizer: Optional[str] = None  # directory with tokenizer.json / vocab.txt (a BERT checkpoint's)
    task_options: Mapping[str, Any] = field(default_factory=dict)
    scenes_images: int = 2000
    scenes_seed: int = 0
    progress: bool = False
    threads: Optional[int] = None  # torch CPU threads; None = the current setting, recorded in train_config.json
    save_total_limit: int = 1  # checkpoints kept (checkpoint-STEP/ directories; `latest` names the newest)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # larger images are bad images (decompression bombs)
    allow_outside_root: bool = False  # image paths may leave the image root (../, absolute paths elsewhere)
    shuffle_buffer: int = 1000  # tar shards (--train "shards/{000000..000099}.tar"): samples in the shuffle buffer
    precision: str = "auto"  # fp32 / bf16 / fp16: autocast on any device; "auto": bf16 (else fp16 + GradScaler) on CUDA only
    compile: bool = False  # torch.compile the model's layers (vlprune.runtime.maybe_compile)
    grad_checkpointing: bool = False  # activation checkpointing of every block (models.base.set_grad_checkpointing)
    accept_changed_inputs: bool = False  # resume although an input file changed (vlprune.guards.check_inputs)
    # the old switch, accepted from earlier train_config.json files and callers: amp=False is precision "fp32"
    amp: InitVar[Optional[bool]] = None

    LEGACY_KEYS = ("amp",)  # keys ``config.from_dict`` accepts besides the fields

    def __post_init__(self, amp: Optional[bool] = None) -> None:
        if amp is not None and not isinstance(amp, bool):
            raise ValueError(f"amp must be True or False, got {amp!r}")
        if amp is False and self.precision == "auto":
            object.__setattr__(self, "precision", "fp32")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.threads is not None:
            check_pos_int("threads", self.threads)
        check_max_pixels(self.max_image_pixels, "max_image_pixels")
        for name in ("batch_size", "accum", "log_every", "ckpt_every", "scenes_images", "save_total_limit",
                     "shuffle_buffer"):
            check_pos_int(name, getattr(self, name))
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        for name in ("steps", "epochs"):
            if getattr(self, name) is not None:
                check_pos_int(name, getattr(self, name))
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip >= 0):
            raise ValueError(f"need lr > 0, weight_decay >= 0, min_lr_ratio in [0, 1], grad_clip >= 0; got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, min_lr_ratio={self.min_lr_ratio}, grad_clip={self.grad_clip}")
        check_finite("lr", self.lr), check_lr_mult(self.lr_mult), check_seed(self.seed)
        check_pos_int("num_workers", self.num_workers, minimum=0)
        object.__setattr__(self, "lr_mult", dict(self.lr_mult))
        object.__setattr__(self, "task_options", dict(self.task_options))
        if self.method is not None and not isinstance(self.method, ReduceConfig):
            if not isinstance(self.method, Mapping):
                raise TypeError(f"method must be a ReduceConfig or its dict, got {type(self.method).__name__}")
            object.__setattr__(self, "method", ReduceConfig.from_dict(self.method))


def refused_fields(saved: TrainConfig, cfg: TrainConfig) -> List[str]:
    """The names of the fields outside ``RESUMABLE_CHANGES`` where ``cfg`` differs from the run's ``saved`` config,
    in field order: a resume with any of them is refused (by ``train(resume=True)`` and ``vlprune train --resume``)."""
    return [f.name for f in fields(TrainConfig)
            if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]


def resume_differences(saved: TrainConfig, cfg: TrainConfig) -> List[str]:
    """``refused_fields`` each as "name (saved X, now Y)"."""
    return [f"{n} (saved {getattr(saved, n)!r}, now {getattr(cfg, n)!r})" for n in refused_fields(saved, cfg)]


def read_train_config(path: Path) -> TrainConfig:
    """The TrainConfig saved in a run's ``train_config.json`` (older runs' ``amp`` switch is understood)."""
    return from_dict(TrainConfig, json.loads(Path(path).read_text()), str(path))

