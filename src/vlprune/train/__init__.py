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

The package reads top down: ``train`` checks the inputs and the run directory (``prepare_out``), ``_setup`` builds
the ``RunState`` (model, optimiser, scheduler, loader, counters; a resume restores the newest checkpoint into it)
and ``loop.run_loop`` runs it as one story. ``run_config`` holds ``TrainConfig`` and the one resume rule
(``RESUMABLE_CHANGES``, ``resume_differences``), which ``vlprune train --resume`` applies too. Where the data comes
from (scenes, a JSON file, tar shards), the checks made before the run directory exists and the micro-batch stream a
run reads are in ``vlprune.train_data``.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

from ..checkpoint import has_checkpoint
from ..config import ModelConfig, load_preset, to_dict
from ..data.datasets import Collate
from ..data.shards import is_shard_spec
from ..data.tokenizer import TextTokenizer
from ..distributed import Procs, barrier, finish_distributed, setup_distributed, wrap_ddp
from ..models.base import set_grad_checkpointing
from ..models.build import build_model, checkpoint_dir, load_init, model_config, read_config, tokenizer_dir
from ..optim import param_groups, warmup_cosine
from ..guards import check_inputs, exists_hint, no_checkpoint_hint, record_inputs
from ..rundir import LOCK_FILE, check_overwrite, clear_run_dir, remove_orphan_temps, run_lock, write_marker
from ..runtime import autocast_dtype, check_precision, maybe_compile
from ..tasks.base import StepModule, get_task
from ..train_data import build_data, input_paths, scenes_data, shard_captions, validate_inputs
from .loop import RunState, restore, run_loop
from .run_config import (CONFIG_FILE, RESUMABLE_CHANGES, TrainConfig, read_train_config, refused_fields,
                         resume_differences)

log = logging.getLogger(__name__)


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
        return run_loop(run, callback)
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
        restore(run)
    return run


__all__ = ["train", "TrainConfig", "CONFIG_FILE", "RESUMABLE_CHANGES", "refused_fields", "resume_differences",
           "read_train_config", "prepare_out", "RunState"]
