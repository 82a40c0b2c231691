"""One training loop for every task: AdamW with per-module learning rates, warm-up + cosine, gradient
accumulation, AMP on CUDA, checkpoint/resume, and DDP under ``torchrun``.

Run directory (``out``)::

    .lock               flock'ed by the run in progress (pid and host inside); a second run is refused
    train_config.json   this TrainConfig, with the torch threads (resuming checks it and restores the threads)
    tokenizer/          tokenizer.json + vocab.txt (trained on the training text unless a checkpoint's is given)
    data/               the built-in scenes data, when no --train file is given
    checkpoint-STEP/    state.pt: model + optimiser + scheduler + counters + RNG states (vlprune.checkpoint: atomic,
                        the newest --save-total-limit kept; torch.load weights_only)
    latest              the name of the checkpoint a resume starts from
    metrics.jsonl       one JSON line per logging interval (rank 0)
    model/              save_pretrained() of the final (or interrupted) model: config.json with the method, the
                        task, the step, total_steps and "interrupted" (true when a signal stopped the run)

A data error (a bad image without --skip-bad-images) or any other error between two optimiser steps writes the
checkpoint of the last completed step before it is raised, so the run resumes from there once the cause is fixed.
A fresh run that fails before its first step leaves no run directory behind. Annotation files, image paths and
the batch size are checked before the run directory is created.

Resume = same result: the data order comes from a ``ResumableSampler`` seeded by ``seed + epoch`` and started at
the saved micro-batch; the randomness of each micro-batch (ITM negatives, MLM masks, methods' noise) comes from
a generator seeded by ``(seed, micro-batch number, rank)``; model buffers (queues), optimiser and scheduler state
and the torch RNG states are restored. ``--batch-size`` is per process; under DDP the global batch is
``batch_size * world_size``.

Where the data comes from (scenes, a JSON file, tar shards), the checks made before the run directory exists and
the micro-batch stream a run reads are in ``vlprune.train_data``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import InitVar, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

from .checkpoint import (has_checkpoint, latest_checkpoint, load_checkpoint, log_state, restore_log, rng_state,
                         save_checkpoint, set_rng_state)
from .config import ModelConfig, check_pos_int, from_dict, load_preset, to_dict
from .data.datasets import Collate
from .data.images import DEFAULT_MAX_PIXELS, check_max_pixels
from .data.shards import is_shard_spec
from .data.tokenizer import TextTokenizer
from .distributed import (Procs, all_reduce_mean, any_rank, barrier, finish_distributed, setup_distributed,
                          wrap_ddp)
from .models.base import set_grad_checkpointing
from .models.build import (build_model, checkpoint_dir, load_init, load_state_strict, model_config, read_config,
                           save_pretrained, tokenizer_dir)
from .optim import param_groups, warmup_cosine
from .reduce.registry import ReduceConfig
from .guards import (check_finite, check_inputs, check_lr_mult, check_seed, diverged, exists_hint, no_checkpoint_hint,
                     raise_if_nonfinite, record_inputs)
from .rundir import LOCK_FILE, check_overwrite, clear_run_dir, remove_orphan_temps, run_lock, trim_metrics, write_marker
from .runtime import PRECISIONS, autocast_dtype, check_precision, maybe_compile
from .tasks.base import StepContext, StepModule, get_task
from .train_data import (build_data, check_data_state, data_state, fetch, image_loader, input_paths, micro_batches,
                         scenes_data, shard_captions, validate_inputs)

log = logging.getLogger(__name__)
CONFIG_FILE = "train_config.json"
# The one list of the TrainConfig fields a resume may change (``resume_differences`` checks the others; the CLI's
# ``train --resume`` accepts the flags of these fields only).
RESUMABLE_CHANGES = ("steps", "epochs", "progress", "num_workers", "log_every", "ckpt_every", "threads",
                     "save_total_limit", "max_image_pixels", "allow_outside_root", "compile", "accept_changed_inputs")


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
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        object.__setattr__(self, "lr_mult", dict(self.lr_mult))
        object.__setattr__(self, "task_options", dict(self.task_options))
        if self.method is not None and not isinstance(self.method, ReduceConfig):
            if not isinstance(self.method, Mapping):
                raise TypeError(f"method must be a ReduceConfig or its dict, got {type(self.method).__name__}")
            object.__setattr__(self, "method", ReduceConfig.from_dict(self.method))


def _mixed_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def resume_differences(saved: TrainConfig, cfg: TrainConfig) -> List[str]:
    """The fields outside ``RESUMABLE_CHANGES`` where ``cfg`` differs from the run's ``saved`` config, each as
    "name (saved X, now Y)": a resume with any of them is refused."""
    return [f"{f.name} (saved {getattr(saved, f.name)!r}, now {getattr(cfg, f.name)!r})" for f in fields(TrainConfig)
            if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]


def read_train_config(path: Path) -> TrainConfig:
    """The TrainConfig saved in a run's ``train_config.json`` (older runs' ``amp`` switch is understood)."""
    return from_dict(TrainConfig, json.loads(Path(path).read_text()), str(path))


def prepare_out(out: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool, procs: Procs) -> TrainConfig:
    """Check the run directory (every rank), then create/clear it (rank 0). Returns the config to use."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    exists = out.exists() and any(p.name != LOCK_FILE for p in out.iterdir())
    if resume:
        if not has_checkpoint(out):
            raise FileNotFoundError(f"cannot resume: no checkpoint in {out} (no latest, checkpoint-STEP/ or "
                                    f"checkpoint.pt){no_checkpoint_hint(out)}")
        saved = read_train_config(out / CONFIG_FILE)
        check_inputs(out, cfg)
        diff = resume_differences(saved, cfg)
        if diff:
            raise ValueError(f"cannot resume {out} with a different config; only {', '.join(RESUMABLE_CHANGES)} may "
                             f"change. Differing from {out / CONFIG_FILE}: {'; '.join(diff)}")
        if cfg.threads is not None and saved.threads not in (None, cfg.threads):
            log.warning("resuming with %d threads instead of the run's %d: the result will not be bitwise the same "
                        "as an uninterrupted run", cfg.threads, saved.threads)
        cfg = replace(cfg, threads=cfg.threads or saved.threads or torch.get_num_threads())
        barrier(procs.world)
        if procs.rank == 0:  # record new steps / epochs, so that a later --resume continues to the same end
            (out / CONFIG_FILE).write_text(json.dumps(to_dict(replace(cfg, accept_changed_inputs=False)), indent=2))
        return cfg
    cfg = replace(cfg, threads=cfg.threads or torch.get_num_threads())
    if exists and not overwrite:
        raise FileExistsError(f"output directory {out} exists; {exists_hint(out)}")
    if exists:
        check_overwrite(out, "run", input_paths(cfg))
    barrier(procs.world)
    if procs.rank == 0:
        if exists:
            clear_run_dir(out)
        write_marker(out, "run")
        (out / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
        record_inputs(out, cfg)
    barrier(procs.world)
    return cfg


def _tokenizer(cfg: TrainConfig, task, entries, *, out: Path, text_cfg, procs: Procs) -> TextTokenizer:
    d = out / "tokenizer"
    source = cfg.tokenizer
    if source is None and cfg.init is not None:
        source = tokenizer_dir(cfg.init)
        if source is None:
            raise FileNotFoundError(f"no tokenizer found with the init checkpoint {cfg.init}; give --tokenizer")
    if procs.rank == 0 and not (d / "tokenizer.json").is_file():
        tok = TextTokenizer.from_dir(source) if source else TextTokenizer.train(task.texts(entries), text_cfg.vocab_size)
        tok.save(d)
    barrier(procs.world)
    tok = TextTokenizer.from_dir(d)
    tok.check_model(text_cfg)
    return tok


class _Stop:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the next optimiser step and returns."""

    def __init__(self):
        self.signal: Optional[int] = None
        self.old: Dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


@dataclass
class RunState:
    """Everything a training run holds from its set-up to its end: what it trains (config, task, model and its DDP
    wrapper, tokenizer), how (optimiser, scheduler, the fp16 gradient scaler, the autocast dtype, the data loader
    and its resumable position) and where it is (optimiser step, micro-batch, skipped samples, the step of the
    newest checkpoint, and whether it is between two steps)."""

    cfg: TrainConfig
    task: Any
    out: Path
    procs: Procs
    model: torch.nn.Module
    wrapped: torch.nn.Module
    tok: TextTokenizer
    mcfg: ModelConfig
    root: Optional[Path]
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Optional[Any]
    amp_dtype: Optional[torch.dtype]
    loader: Any
    position: Any
    per_epoch: int
    total: int
    warmup: int
    step: int = 0
    micro: int = 0
    skipped: int = 0
    saved: Optional[int] = None  # the step of the newest checkpoint (None: none yet)
    clean: bool = True  # between two optimiser steps (False while one is under way)
    log: Optional[Dict[str, Any]] = None  # the metrics row being summed when the resumed checkpoint was saved
    meter: Optional["_Meter"] = None  # the losses summed since the last log line (set by the loop)

    def checkpoint(self, final: bool = False, interrupted: bool = False) -> None:
        """Rank 0 saves the state of the current step (unless saved already) and, when ``final``, the model;
        every rank meets at the barrier."""
        if self.procs.rank == 0:
            if self.saved != self.step:
                save_checkpoint({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                                 "scheduler": self.sched.state_dict(),
                                 "scaler": self.scaler.state_dict() if self.scaler else {},
                                 "step": self.step, "micro": self.micro, "skipped": self.skipped, "rng": rng_state(),
                                 "data": data_state(self.position, self.micro, self.per_epoch, self.cfg.batch_size),
                                 "log": log_state(self.meter.sums, self.meter.n_micro) if self.meter else None},
                                self.out, keep=self.cfg.save_total_limit)
            if final:
                save_pretrained(self.model, self.out / "model", extra={
                    "task": self.cfg.task, "tokenizer": "../tokenizer", "step": self.step, "total_steps": self.total,
                    "interrupted": interrupted, **self.task.save_extra()})
        self.saved = self.step
        barrier(self.procs.world)


@dataclass
class _Meter:
    """The losses summed since the last log line, and the first and last log records."""

    epoch: int = 0
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    n_micro: int = 0
    t0: float = field(default_factory=time.perf_counter)
    first: Optional[Dict[str, Any]] = None
    last: Optional[Dict[str, Any]] = None


def train(cfg: TrainConfig, out: Union[str, Path], resume: bool = False, overwrite: bool = False,
          callback: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train ``cfg.task``; returns {"steps", "total_steps", "interrupted", "signal", "first", "last", "skipped",
    "out", "val", "threads"}.
    ``callback(step, record)`` runs after every optimiser step (tests use it to send a signal)."""
    procs = setup_distributed()
    threads = torch.get_num_threads()
    try:
        with ExitStack() as stack:
            return _train(cfg, Path(out), resume=resume, overwrite=overwrite, callback=callback, procs=procs,
                          stack=stack)
    finally:
        torch.set_num_threads(threads)
        finish_distributed(procs)


def _train(cfg: TrainConfig, out: Path, *, resume: bool, overwrite: bool, callback, procs: Procs,
           stack: ExitStack) -> Dict[str, Any]:
    task = get_task(cfg.task, **cfg.task_options)
    init_meta = None
    if cfg.init is not None:
        mcfg, init_meta = model_config(cfg.init), read_config(checkpoint_dir(cfg.init))
        if init_meta.get("interrupted"):
            log.warning("--init %s is the model of an interrupted run (step %s of %s)", cfg.init,
                        init_meta.get("step"), init_meta.get("total_steps"))
    else:
        mcfg = load_preset(cfg.model)
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg, cfg.method).to(procs.device).train()  # a bad method fails before the run dir is touched
    task.check_model(model)
    entries, root = validate_inputs(cfg, task, mcfg, procs.world)  # and so does bad data
    stack.enter_context(run_lock(out, procs.rank, procs.world))  # held until train() returns; a second run is refused
    cfg = prepare_out(out, cfg, resume=resume, overwrite=overwrite, procs=procs)
    try:
        run = _setup(cfg, task, mcfg, model, init_meta=init_meta, entries=entries, root=root, out=out, resume=resume,
                     procs=procs)
        return _loop(run, callback)
    except BaseException:
        if not resume and procs.rank == 0 and not has_checkpoint(out):
            clear_run_dir(out)  # nothing was trained: leave no run directory that a rerun would trip over
        raise


def _autocast(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg.precision`` on ``device`` (None: fp32). "auto": bf16 where CUDA supports it, else
    fp16, on CUDA only."""
    if cfg.precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return autocast_dtype(check_precision(cfg.precision, device))


def _setup(cfg: TrainConfig, task, mcfg: ModelConfig, model, *, init_meta: Optional[dict], entries, root,
           out: Path, resume: bool, procs: Procs) -> RunState:
    """Data, tokenizer, heads, optimiser, scheduler, the resumed state and the DataLoader of a run."""
    rank, world, device = procs.rank, procs.world, procs.device
    if resume and rank == 0:
        remove_orphan_temps(out)  # a checkpoint write killed mid-way
    torch.set_num_threads(cfg.threads)  # saved in train_config.json: resume is bitwise exact with the same threads
    if is_shard_spec(cfg.train):
        entries, root = shard_captions(cfg, out, rank)
    elif entries is None:
        entries, root = scenes_data(cfg, task, out, mcfg.vision.image_size, rank, world)
    tok = _tokenizer(cfg, task, entries, out=out, text_cfg=mcfg.text, procs=procs)
    dataset, sampler, position = build_data(cfg, task, entries, mcfg, root, rank, world)
    per_epoch = position.num_samples // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"{position.num_samples * world} samples over {world} process(es) give no full batch of "
                         f"{cfg.batch_size} (--batch-size)")
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * per_epoch // cfg.accum
    if total < 1:
        raise ValueError(f"one epoch has {per_epoch} micro-batches, fewer than --accum {cfg.accum}: no optimiser step")
    warmup = cfg.warmup if cfg.warmup >= 0 else max(1, total // 20)

    if init_meta is not None:
        task.restore(init_meta, model)  # e.g. the VQA answer vocabulary of a fine-tuned init
    task.prepare(model, entries, out, device)  # task heads, vocabularies, teacher, frozen parts
    if cfg.init is not None and not resume:
        load_init(model, cfg.init)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, cfg.lr_mult), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, cfg.min_lr_ratio))
    amp_dtype = _autocast(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and amp_dtype == torch.float16) else None
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    maybe_compile(model, cfg.compile, device)
    wrapped = StepModule(model, task)
    if world > 1:
        wrapped = wrap_ddp(wrapped, device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=Collate(tok, mcfg.text.max_len), num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda")
    run = RunState(cfg=cfg, task=task, out=out, procs=procs, model=model, wrapped=wrapped, tok=tok, mcfg=mcfg,
                   root=root, opt=opt, sched=sched, scaler=scaler, amp_dtype=amp_dtype, loader=loader,
                   position=position, per_epoch=per_epoch, total=total, warmup=warmup)
    if resume:
        _restore(run)
    return run


def _restore(run: RunState) -> None:
    """A resumed run: model, optimiser, scheduler, scaler, counters and RNG states of the newest checkpoint."""
    ck = load_checkpoint(run.out)
    load_state_strict(run.model, ck["model"], str(latest_checkpoint(run.out)))
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    if run.scaler is not None and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    run.step, run.micro, run.skipped, run.log = ck["step"], ck["micro"], ck["skipped"], ck.get("log")
    run.saved = run.step
    check_data_state(ck.get("data"), run.position, run.out)
    set_rng_state(ck["rng"])
    if run.procs.rank == 0:
        trim_metrics(run.out, run.step)  # rows logged after the checkpoint are logged again
    log.info("resumed %s at step %d (micro-batch %d)", run.out, run.step, run.micro)


def _loop(run: RunState, callback) -> Dict[str, Any]:
    """The training loop: read the micro-batches of a step, run them, take the optimiser step, log, checkpoint,
    stop on a signal. The micro-batches of an optimiser step are read before it runs, so a data error always
    stops the run between two steps: the state of the last completed step is then saved as a checkpoint (every
    rank agrees on that), and the error is raised with ``saved_step`` set on it."""
    from tqdm import tqdm

    cfg = run.cfg
    bar = tqdm(total=run.total, initial=run.step, disable=not (cfg.progress and run.procs.rank == 0),
               dynamic_ncols=True, unit="step")
    meter = _Meter(epoch=run.micro // run.per_epoch)
    meter.sums, meter.n_micro = restore_log(run.log, run.procs.world)  # rows after a resume = an uninterrupted run's
    run.meter = meter
    interrupted = False
    batches = micro_batches(run.loader, run.position, run.per_epoch, cfg.batch_size, run.micro)
    try:
        with _Stop() as stop:
            while run.step < run.total and not interrupted:
                group = _read_step(run, batches)
                run.clean = False  # from here until the step is done, the model is between two steps
                _forward_backward(run, group, meter)
                raise_if_nonfinite(meter.sums.get("loss"), run.step + 1, run.saved, run.out, run.procs.world)
                _optimizer_step(run)
                run.step += 1
                run.clean = True
                bar.update(1)
                record = _log_step(run, meter, bar)
                if callback is not None:
                    callback(run.step, record or {})
                if run.step % cfg.ckpt_every == 0 and run.step < run.total:
                    run.checkpoint()
                if stop.signal is not None:
                    log.warning("signal %d: checkpoint at step %d; continue with --resume", stop.signal, run.step)
                    interrupted = True
    except _DataError as e:
        raise e.error from None
    except BaseException as e:
        div = None if run.clean else diverged(e, run.step + 1, run.saved, run.out)  # NaN / inf: exit 2 naming the step
        if div is not None:
            raise div from (None if div is e else e)
        if run.procs.world == 1 and run.clean and run.step > (run.saved or 0):  # the state is that of `step`
            _save_on_error(e, run)
        elif run.saved is not None:
            _note(e, run.saved)
        raise
    finally:
        bar.close()
        batches.close()
    run.checkpoint(final=True, interrupted=interrupted)
    if run.skipped:
        log.warning("skipped %d sample(s) with bad images", run.skipped)
    val = _validate(run) if cfg.val is not None and not interrupted else None
    return {"steps": run.step, "total_steps": run.total, "interrupted": interrupted, "first": meter.first,
            "last": meter.last, "skipped": run.skipped, "out": str(run.out), "val": val, "threads": cfg.threads,
            "signal": int(stop.signal) if stop.signal is not None else None}


def _read_step(run: RunState, batches) -> list:
    """The micro-batches of the next optimiser step; a data error on any rank checkpoints and stops the run."""
    group, error = fetch(batches, run.cfg.accum)
    if any_rank(error is not None, run.procs):
        raise _data_error(error, run)
    return group


def _forward_backward(run: RunState, group: list, meter: _Meter) -> None:
    """Forward and backward of each micro-batch of one optimiser step (gradients synchronised on the last)."""
    cfg, (rank, world, device) = run.cfg, run.procs[:3]
    for epoch, batch in group:
        meter.epoch = epoch
        run.skipped += batch["skipped"]
        gen = torch.Generator(device=device).manual_seed(_mixed_seed(cfg.seed, run.micro, rank))
        ctx = StepContext(gen, run.tok, run.step, run.total, run.warmup)
        run.micro += 1
        if batch["size"] == 0:
            if world > 1:
                raise RuntimeError("a whole local batch had bad images; DDP needs a sample on every rank")
            continue
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync = run.micro % cfg.accum == 0
        no_sync = run.wrapped.no_sync() if (world > 1 and not sync) else nullcontext()
        with no_sync, torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            losses = run.wrapped(batch, ctx)
            loss = losses["loss"] / cfg.accum
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        for k, v in losses.items():
            meter.sums[k] = meter.sums.get(k, 0.0) + v.detach().float()
        meter.n_micro += 1


class _DataError(Exception):
    """Carries a data error (already checkpointed) through the loop's generic handler."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _note(e: BaseException, step: Optional[int]) -> None:
    try:
        e.saved_step = step  # type: ignore[attr-defined]  (the CLI prints the resume command)
    except AttributeError:
        pass


def _save_on_error(e: BaseException, run: RunState) -> None:
    try:
        run.checkpoint()
    except Exception as save_error:  # never hide the first error behind this one
        log.error("could not write a checkpoint after the error: %s", save_error)
        return
    log.warning("stopped by an error after step %d: checkpoint written; continue with --resume once the cause is "
                "fixed", run.step)
    _note(e, run.step)


def _data_error(error: Optional[BaseException], run: RunState) -> _DataError:
    """The error a data failure (on this rank or another) stops the run with, after the checkpoint of the step."""
    step, saved = run.step, run.saved
    if step > (saved or 0):
        run.checkpoint()  # every rank is here: rank 0 writes, all meet at the barrier
        log.warning("stopped by a data error after step %d: checkpoint written; continue with --resume once the "
                    "data is fixed", step)
    if error is None:
        error = RuntimeError(f"another process stopped the run with a data error after step {step}")
    _note(error, step if step > 0 or saved is not None else None)
    return _DataError(error)


def _optimizer_step(run: RunState) -> None:
    opt, scaler = run.opt, run.scaler
    if scaler is not None:
        scaler.unscale_(opt)
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    run.sched.step()


def _validate(run: RunState) -> Dict[str, float]:
    """Evaluate the final model on ``cfg.val`` (images under the training image root); logged to metrics.jsonl."""
    from .tasks.evaluation import evaluate

    cfg, (rank, world, device) = run.cfg, run.procs[:3]
    entries = run.task.load_test(cfg.val)
    metrics, info = evaluate(run.task, run.model, entries, image_loader(cfg, run.mcfg, run.root), run.tok,
                             cfg.batch_size, device, rank, world, cfg.progress)
    run.model.train()
    if rank == 0:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": run.step, "val": metrics, "val_examples": info["examples"]}) + "\n")
    return metrics


def _log_step(run: RunState, meter: _Meter, bar) -> Optional[Dict[str, Any]]:
    """Every ``log_every`` steps (and at the last): one metrics.jsonl record of the means since the last one."""
    cfg = run.cfg
    if not (run.step % cfg.log_every == 0 or run.step == run.total):
        return None
    rec: Dict[str, Any] = {"step": run.step, "epoch": meter.epoch}
    for k, v in meter.sums.items():
        rec[k] = float(all_reduce_mean(v / max(meter.n_micro, 1)))
    dt = max(time.perf_counter() - meter.t0, 1e-9)
    rec["lr"] = run.opt.param_groups[0]["lr"]
    rec["samples_per_s"] = meter.n_micro * cfg.batch_size * run.procs.world / dt
    rec["skipped"] = run.skipped
    rec["time"] = time.time()
    if run.procs.rank == 0:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    bar.set_postfix(loss=f"{rec['loss']:.3f}", rate=f"{rec['samples_per_s']:.0f}/s")
    meter.first = meter.first or rec
    meter.last = rec
    meter.sums, meter.n_micro, meter.t0 = {}, 0, time.perf_counter()
    return rec
