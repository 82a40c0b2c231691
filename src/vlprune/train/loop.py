"""The training loop, as one story (``run_loop``): read the micro-batches of an optimiser step, forward and
backward, the optimiser step, log, checkpoint, stop on a signal; and the state it reads and writes (``RunState``,
built by ``vlprune.train._setup``; ``restore`` puts back the newest checkpoint's). The helpers below the loop are
its steps: ``_read_step``, ``_forward_backward``, ``_optimizer_step``, ``_log_step``, ``_validate``, and what an
error does (``_stopped_by``: the checkpoint of the last completed step, the step named on the error)."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..checkpoint import latest_checkpoint, load_checkpoint, log_state, restore_log, rng_state, save_checkpoint, set_rng_state
from ..config import ModelConfig
from ..data.tokenizer import TextTokenizer
from ..distributed import Procs, all_reduce_mean, any_rank, barrier
from ..guards import diverged, raise_if_nonfinite
from ..models.build import load_state_strict, save_pretrained
from ..rundir import trim_metrics
from ..tasks.base import StepContext
from ..train_data import check_data_state, data_state, fetch, image_loader, micro_batches
from .run_config import TrainConfig

log = logging.getLogger(__name__)


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

    @classmethod
    def resumed(cls, run: "RunState") -> "_Meter":
        """The meter at the run's micro-batch, holding the sums of the metrics row the checkpoint was saved in."""
        meter = cls(epoch=run.micro // run.per_epoch)
        meter.sums, meter.n_micro = restore_log(run.log, run.procs.world)
        return meter


def restore(run: RunState) -> None:
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


def run_loop(run: RunState, callback: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """The training loop: read the micro-batches of a step, run them, take the optimiser step, log, checkpoint,
    stop on a signal; then save the model and validate. The micro-batches of an optimiser step are read before it
    runs, so a data error always stops the run between two steps: the state of the last completed step is then
    saved as a checkpoint (every rank agrees on that), and the error is raised with ``saved_step`` set on it."""
    cfg = run.cfg
    bar = _progress_bar(run)
    meter = run.meter = _Meter.resumed(run)  # rows after a resume = an uninterrupted run's
    batches = micro_batches(run.loader, run.position, run.per_epoch, cfg.batch_size, run.micro)
    try:
        with _Stop() as stop:
            while run.step < run.total and stop.signal is None:
                group = _read_step(run, batches)
                run.clean = False  # from here until the step is done, the model is between two steps
                _forward_backward(run, group, meter)
                raise_if_nonfinite(meter.sums.get("loss"), run.step + 1, run.saved, run.out, run.procs.world)
                _optimizer_step(run)
                run.step, run.clean = run.step + 1, True
                bar.update(1)
                record = _log_step(run, meter, bar)
                if callback is not None:
                    callback(run.step, record or {})
                if run.step % cfg.ckpt_every == 0 and run.step < run.total:
                    run.checkpoint()
    except _DataError as e:
        raise e.error from None
    except BaseException as e:
        _stopped_by(e, run)
        raise
    finally:
        bar.close()
        batches.close()
    interrupted = stop.signal is not None
    if interrupted:
        log.warning("signal %d: checkpoint at step %d; continue with --resume", stop.signal, run.step)
    run.checkpoint(final=True, interrupted=interrupted)
    if run.skipped:
        log.warning("skipped %d sample(s) with bad images", run.skipped)
    val = _validate(run) if cfg.val is not None and not interrupted else None
    return {"steps": run.step, "total_steps": run.total, "interrupted": interrupted, "first": meter.first,
            "last": meter.last, "skipped": run.skipped, "out": str(run.out), "val": val, "threads": cfg.threads,
            "signal": int(stop.signal) if interrupted else None}


def _progress_bar(run: RunState):
    from tqdm import tqdm

    return tqdm(total=run.total, initial=run.step, disable=not (run.cfg.progress and run.procs.rank == 0),
                dynamic_ncols=True, unit="step")


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


def _validate(run: RunState) -> Dict[str, float]:
    """Evaluate the final model on ``cfg.val`` (images under the training image root); logged to metrics.jsonl."""
    from ..tasks.evaluation import evaluate

    cfg, (rank, world, device) = run.cfg, run.procs[:3]
    entries = run.task.load_test(cfg.val)
    metrics, info = evaluate(run.task, run.model, entries, image_loader(cfg, run.mcfg, run.root), run.tok,
                             cfg.batch_size, device, rank, world, cfg.progress)
    run.model.train()
    if rank == 0:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": run.step, "val": metrics, "val_examples": info["examples"]}) + "\n")
    return metrics


def _stopped_by(e: BaseException, run: RunState) -> None:
    """What an error in the loop does before it is raised: a NaN / inf loss raises the error naming its step (exit
    2); an error between two steps checkpoints the last completed step (one process) or notes the newest
    checkpoint's step on the error, for the CLI's resume hint."""
    div = None if run.clean else diverged(e, run.step + 1, run.saved, run.out)
    if div is not None:
        raise div from (None if div is e else e)
    if run.procs.world == 1 and run.clean and run.step > (run.saved or 0):  # the state is that of `step`
        _save_on_error(e, run)
    elif run.saved is not None:
        _note(e, run.saved)


class _DataError(Exception):
    """Carries a data error (already checkpointed) through the loop's generic handler."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


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


def _save_on_error(e: BaseException, run: RunState) -> None:
    try:
        run.checkpoint()
    except Exception as save_error:  # never hide the first error behind this one
        log.error("could not write a checkpoint after the error: %s", save_error)
        return
    log.warning("stopped by an error after step %d: checkpoint written; continue with --resume once the cause is "
                "fixed", run.step)
    _note(e, run.step)


def _note(e: BaseException, step: Optional[int]) -> None:
    try:
        e.saved_step = step  # type: ignore[attr-defined]  (the CLI prints the resume command)
    except AttributeError:
        pass


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


def _mixed_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (FNV-1a style): the seed of one micro-batch's generator on one rank."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
