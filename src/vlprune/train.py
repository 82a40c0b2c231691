"""One training loop for every task: AdamW with per-module learning rates, warm-up + cosine, gradient
accumulation, AMP on CUDA, checkpoint/resume, and DDP under ``torchrun``.

Run directory (``out``)::

    .lock               flock'ed by the run in progress (pid and host inside); a second run is refused
    train_config.json   this TrainConfig, with the torch threads (resuming checks it and restores the threads)
    tokenizer/          tokenizer.json + vocab.txt (trained on the training text unless a checkpoint's is given)
    data/               the built-in scenes data, when no --train file is given
    checkpoint.pt       model + optimiser + scheduler + counters + RNG states (atomic; torch.load weights_only)
    metrics.jsonl       one JSON line per logging interval (rank 0)
    model/              save_pretrained() of the final (or interrupted) model: config.json with the method

Resume = same result: the data order comes from a ``ResumableSampler`` seeded by ``seed + epoch`` and started at
the saved micro-batch; the randomness of each micro-batch (ITM negatives, MLM masks, methods' noise) comes from
a generator seeded by ``(seed, micro-batch number, rank)``; model buffers (queues), optimiser and scheduler state
and the torch RNG states are restored. ``--batch-size`` is per process; under DDP the global batch is
``batch_size * world_size``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
import torch.distributed as dist

from .checkpoint import CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import from_dict, load_preset, to_dict
from .data.datasets import Collate, ResumableSampler
from .data.images import ImageLoader
from .data.tokenizer import TextTokenizer
from .distributed import wrap_ddp
from .models.build import build_model, load_state_strict, save_pretrained
from .optim import param_groups, warmup_cosine
from .reduce.registry import ReduceConfig
from .rundir import LOCK_FILE, clear_run_dir, remove_orphan_temps, run_lock, trim_metrics
from .runtime import PRECISIONS, autocast_dtype, check_precision, maybe_compile
from .tasks.base import StepContext, StepModule, get_task

log = logging.getLogger(__name__)
CONFIG_FILE = "train_config.json"
RESUMABLE_CHANGES = ("steps", "epochs", "progress", "num_workers", "log_every", "ckpt_every", "threads")


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
    amp: bool = True  # autocast (bf16, else fp16 + GradScaler) on CUDA only
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
    precision: str = "auto"  # fp32 / bf16 / fp16: autocast on any device; "auto": as ``amp`` says (CUDA only)
    compile: bool = False  # torch.compile the model's layers (vlprune.runtime.maybe_compile)

    def __post_init__(self) -> None:
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        for name in ("batch_size", "accum", "log_every", "ckpt_every", "scenes_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        for name in ("steps", "epochs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip >= 0):
            raise ValueError(f"need lr > 0, weight_decay >= 0, min_lr_ratio in [0, 1], grad_clip >= 0; got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, min_lr_ratio={self.min_lr_ratio}, grad_clip={self.grad_clip}")
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


def setup_distributed():
    """(rank, world, device, started_here): joins the torchrun process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, started
    return 0, 1, device, started


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def prepare_out(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool, rank: int, world: int) -> TrainConfig:
    """Check the run directory (every rank), then create/clear it (rank 0). Returns the config to use."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    exists = out.exists() and any(p.name != LOCK_FILE for p in out.iterdir())
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {out}")
        saved = from_dict(TrainConfig, json.loads((out / CONFIG_FILE).read_text()), str(out / CONFIG_FILE))
        diff = [f"{f.name} (saved {getattr(saved, f.name)!r}, now {getattr(cfg, f.name)!r})" for f in fields(TrainConfig)
                if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]
        if diff:
            raise ValueError(f"cannot resume {out} with a different config; only {', '.join(RESUMABLE_CHANGES)} may "
                             f"change. Differing from {out / CONFIG_FILE}: {'; '.join(diff)}")
        if cfg.threads is not None and saved.threads not in (None, cfg.threads):
            log.warning("resuming with %d threads instead of the run's %d: the result will not be bitwise the same "
                        "as an uninterrupted run", cfg.threads, saved.threads)
        cfg = replace(cfg, threads=cfg.threads or saved.threads or torch.get_num_threads())
        _barrier(world)
        if rank == 0:  # record new steps / epochs, so that a later --resume continues to the same end
            (out / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
        return cfg
    cfg = replace(cfg, threads=cfg.threads or torch.get_num_threads())
    if exists and not overwrite:
        raise FileExistsError(f"output directory {out} exists; use --overwrite to replace it or --resume to continue")
    _barrier(world)
    if rank == 0:
        if exists:
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
    _barrier(world)
    return cfg


def _data(cfg: TrainConfig, task, out: Path, image_size: int, rank: int, world: int):
    if cfg.train is None:
        from .data.scenes import generate

        root = out / "data"
        if rank == 0 and not (root / task.scenes_file).is_file():
            generate(root, images=cfg.scenes_images, seed=cfg.scenes_seed, image_size=image_size)
        _barrier(world)
        return task.load(root / task.scenes_file), root
    path = Path(cfg.train)
    return task.load(path), Path(cfg.images) if cfg.images else path.parent


def _tokenizer(cfg: TrainConfig, task, entries, out: Path, text_cfg, rank: int, world: int) -> TextTokenizer:
    d = out / "tokenizer"
    source = cfg.tokenizer
    if source is None and cfg.init is not None:
        from .tasks.finetune import tokenizer_dir

        source = tokenizer_dir(cfg.init)
        if source is None:
            raise FileNotFoundError(f"no tokenizer found with the init checkpoint {cfg.init}; give --tokenizer")
    if rank == 0 and not (d / "tokenizer.json").is_file():
        tok = TextTokenizer.from_dir(source) if source else TextTokenizer.train(task.texts(entries), text_cfg.vocab_size)
        tok.save(d)
    _barrier(world)
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


def train(cfg: TrainConfig, out: Union[str, Path], resume: bool = False, overwrite: bool = False,
          callback: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train ``cfg.task``; returns {"steps", "total_steps", "interrupted", "signal", "first", "last", "skipped",
    "out", "val", "threads"}.
    ``callback(step, record)`` runs after every optimiser step (tests use it to send a signal)."""
    rank, world, device, started = setup_distributed()
    threads = torch.get_num_threads()
    try:
        with ExitStack() as stack:
            return _train(cfg, Path(out), resume, overwrite, callback, rank, world, device, stack)
    finally:
        torch.set_num_threads(threads)
        if started:
            dist.destroy_process_group()


def _train(cfg, out, resume, overwrite, callback, rank, world, device, stack) -> Dict[str, Any]:
    task = get_task(cfg.task, **cfg.task_options)
    init_meta = None
    if cfg.init is not None:
        from .models.build import read_config
        from .tasks.finetune import checkpoint_dir, model_config

        mcfg, init_meta = model_config(cfg.init), read_config(checkpoint_dir(cfg.init))
    else:
        mcfg = load_preset(cfg.model)
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg, cfg.method).to(device).train()  # a bad method fails before the run dir is touched
    task.check_model(model)
    stack.enter_context(run_lock(out, rank, world))  # held until train() returns; a second run is refused
    cfg = prepare_out(out, cfg, resume, overwrite, rank, world)
    if resume and rank == 0:
        remove_orphan_temps(out)  # a checkpoint write killed mid-way
    torch.set_num_threads(cfg.threads)  # saved in train_config.json: resume is bitwise exact with the same threads
    entries, root = _data(cfg, task, out, mcfg.vision.image_size, rank, world)
    tok = _tokenizer(cfg, task, entries, out, mcfg.text, rank, world)
    dataset = task.build_dataset(entries, ImageLoader.for_model(mcfg.vision, root), cfg.skip_bad_images)
    sampler = ResumableSampler(dataset, world, rank, shuffle=True, seed=cfg.seed)
    per_epoch = sampler.num_samples // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples over {world} process(es) give no full batch of {cfg.batch_size}")
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * per_epoch // cfg.accum
    if total < 1:
        raise ValueError(f"one epoch has {per_epoch} micro-batches, fewer than accum={cfg.accum}: no optimiser step")
    warmup = cfg.warmup if cfg.warmup >= 0 else max(1, total // 20)

    if init_meta is not None:
        task.restore(init_meta, model)  # e.g. the VQA answer vocabulary of a fine-tuned init
    task.prepare(model, entries, out, device)  # task heads, vocabularies, teacher, frozen parts
    if cfg.init is not None and not resume:
        from .tasks.finetune import load_init

        load_init(model, cfg.init)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, cfg.lr_mult), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, cfg.min_lr_ratio))
    cuda = device.type == "cuda"
    if cfg.precision == "auto":
        amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if (cuda and cfg.amp) else None
    else:
        amp_dtype = autocast_dtype(check_precision(cfg.precision, device))
    scaler = torch.amp.GradScaler("cuda") if (cuda and amp_dtype == torch.float16) else None
    maybe_compile(model, cfg.compile, device)
    step = micro = skipped = 0
    if resume:
        ck = load_checkpoint(out)
        load_state_strict(model, ck["model"], str(out / CHECKPOINT))
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, micro, skipped = ck["step"], ck["micro"], ck["skipped"]
        set_rng_state(ck["rng"])
        if rank == 0:
            trim_metrics(out, step)  # rows logged after the checkpoint are logged again
        log.info("resumed %s at step %d (micro-batch %d)", out, step, micro)
    wrapped = StepModule(model, task)
    if world > 1:
        wrapped = wrap_ddp(wrapped, device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=Collate(tok, mcfg.text.max_len), num_workers=cfg.num_workers,
                                         pin_memory=cuda)

    def checkpoint(final: bool) -> None:
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "scaler": scaler.state_dict() if scaler else {}, "step": step, "micro": micro,
                             "skipped": skipped, "rng": rng_state()}, out)
            if final:
                save_pretrained(model, out / "model", extra={"task": cfg.task, "tokenizer": "../tokenizer", **task.save_extra()})
        _barrier(world)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not (cfg.progress and rank == 0), dynamic_ncols=True, unit="step")
    sums: Dict[str, torch.Tensor] = {}
    n_micro, t0, first, last = 0, time.perf_counter(), None, None
    interrupted = False
    with _Stop() as stop:
        while step < total and not interrupted:
            epoch, offset = divmod(micro, per_epoch)
            sampler.set_position(epoch, offset * cfg.batch_size)
            for batch in loader:
                skipped += batch["skipped"]
                gen = torch.Generator(device=device).manual_seed(_mixed_seed(cfg.seed, micro, rank))
                ctx = StepContext(gen, tok, step, total, warmup)
                micro += 1
                sync = micro % cfg.accum == 0
                if batch["size"] == 0:
                    if world > 1:
                        raise RuntimeError("a whole local batch had bad images; DDP needs a sample on every rank")
                else:
                    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                    no_sync = wrapped.no_sync() if (world > 1 and not sync) else nullcontext()
                    with no_sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        losses = wrapped(batch, ctx)
                        loss = losses["loss"] / cfg.accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                    n_micro += 1
                if not sync:
                    continue
                if scaler is not None:
                    scaler.unscale_(opt)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                bar.update(1)
                record = None
                if step % cfg.log_every == 0 or step == total:
                    record = _log(out, sums, n_micro, step, epoch, opt, cfg, world, t0, skipped, rank)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", rate=f"{record['samples_per_s']:.0f}/s")
                    first = first or record
                    last = record
                    sums, n_micro, t0 = {}, 0, time.perf_counter()
                if callback is not None:
                    callback(step, record or {})
                if step % cfg.ckpt_every == 0 and step < total:
                    checkpoint(False)
                if stop.signal is not None:
                    log.warning("signal %d: checkpoint at step %d; continue with --resume", stop.signal, step)
                    interrupted = True
                if step >= total or interrupted:
                    break
    bar.close()
    checkpoint(True)
    if skipped:
        log.warning("skipped %d sample(s) with bad images", skipped)
    val = None
    if cfg.val is not None and not interrupted:
        val = _validate(cfg, task, model, tok, mcfg, root, out, device, rank, world, step)
    return {"steps": step, "total_steps": total, "interrupted": interrupted, "first": first, "last": last,
            "skipped": skipped, "out": str(out), "val": val, "threads": cfg.threads,
            "signal": int(stop.signal) if stop.signal is not None else None}


def _validate(cfg, task, model, tok, mcfg, root, out, device, rank, world, step) -> Dict[str, float]:
    """Evaluate the final model on ``cfg.val`` (images under the training image root); logged to metrics.jsonl."""
    from .tasks.evaluation import evaluate

    images = root  # the training image root
    entries = task.load_test(cfg.val)
    metrics, info = evaluate(task, model, entries, ImageLoader.for_model(mcfg.vision, images), tok, cfg.batch_size,
                             device, rank, world, cfg.progress)
    model.train()
    if rank == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "val": metrics, "val_examples": info["examples"]}) + "\n")
    return metrics


def _log(out, sums, n, step, epoch, opt, cfg, world, t0, skipped, rank) -> Dict[str, Any]:
    from .distributed import all_reduce_mean

    rec: Dict[str, Any] = {"step": step, "epoch": epoch}
    for k, v in sums.items():
        rec[k] = float(all_reduce_mean(v / max(n, 1)))
    dt = max(time.perf_counter() - t0, 1e-9)
    rec["lr"] = opt.param_groups[0]["lr"]
    rec["samples_per_s"] = n * cfg.batch_size * world / dt
    rec["skipped"] = skipped
    rec["time"] = time.time()
    if rank == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec
