"""``vlprune train TASK``: train on the field's annotation files or, with no --train, on the built-in scenes data.

    vlprune train pretrain --model small --method trips --layers 5 --keep 0.7 --steps 300 --out runs/pt
    torchrun --nproc_per_node=2 -m vlprune train pretrain --model small --steps 300 --out runs/pt-ddp
    vlprune train vqa --init runs/pt --steps 300 --out runs/vqa            # fine-tune a pre-trained run
    vlprune train vqa --init runs/vqa --method tip --teacher runs/vqa --stage 1 --out runs/vqa-tip1
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from .method_flags import add_image_flags, add_method_flags, image_options, method_config
from .official import add_official_flags, check_official_flags, convert, use_reported_method


def _pairs(text: str, flag: str) -> dict:
    """``a=1,b=0.5`` -> {"a": 1.0, "b": 0.5}; anything else raises naming ``flag``."""
    out = {}
    for part in filter(None, (text or "").split(",")):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"{flag}: expected NAME=VALUE pairs separated by commas (e.g. itc=1,mlm=0.3), got {part!r}")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"{flag}: the value of {k.strip()} must be a number, got {v.strip()!r}") from None
    return out


OPTION_FLAGS = ("teacher", "stage", "answers", "k")  # task options with flags of their own


def _loss_options(task: str, text: str) -> dict:
    """The ``--loss`` pairs, each checked against the options the task has."""
    from vlprune.tasks.base import task_option_names

    pairs = _pairs(text, "--loss")
    allowed = [n for n in task_option_names(task) if n not in OPTION_FLAGS]
    bad = [k for k in pairs if k not in allowed]
    if bad:
        raise ValueError(f"--loss: unknown option {bad[0]!r} for task {task!r}; valid: {', '.join(allowed)}")
    return pairs


def add_parser(sub) -> None:
    from vlprune.tasks.base import list_tasks

    p = sub.add_parser("train", help="train a model (pretrain, retrieval, vqa, nlvr2, ve) with checkpoints, resume and DDP")
    p.add_argument("task", choices=list_tasks(), help="what to train")
    p.add_argument("--train", default=None, help="annotation JSON, or tar shards from `vlprune data shards` as a "
                   "pattern such as 'shards/{000000..000123}.tar' (default: built-in scenes data in RUN_DIR/data)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="tar shards: samples in the shuffle buffer")
    p.add_argument("--val", default=None, help="annotation JSON (test format) evaluated after training")
    p.add_argument("--images", default=None, help="image root (default: the annotation file's folder)")
    p.add_argument("--model", default=None, help="preset name or config JSON (default small; with --init: the init's)")
    p.add_argument("--init", default=None, help="start from this pre-trained run or saved model (and its tokenizer)")
    p.add_argument("--teacher", default=None, help="TiP / DynamicViT: the same task fine-tuned without pruning (run dir)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=None,
                   help="TiP stage: 1 = frozen backbone, pruners + head, lam 0; 2 = + cross-modal layers, lam 1")
    p.add_argument("--answers", default=None, help="VQA: answer_list.json for the answer vocabulary (default: training answers)")
    p.add_argument("--k", type=int, default=None, help="retrieval: ITM re-ranking candidates for --val (default 128)")
    add_method_flags(p, method_help="reduction method (default: none)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimiser steps")
    g.add_argument("--epochs", type=int, default=None, help="passes over the data (1 when neither --steps nor --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing: keep only each "
                   "transformer block's input and recompute the block in the backward pass (less memory, ~1/3 more compute)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the preset's recipe: small/tiny from scratch 3e-4 for pretrain, "
                   "1e-3 for a downstream task; 2e-4 with --init; 1e-4 otherwise)")
    p.add_argument("--lr-mult", default="", help="per-module lr multipliers, e.g. vision=0.5,reducers=10")
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=-1, help="warm-up steps (-1: 5%% of the steps)")
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--tokenizer", default=None, help="directory with a checkpoint's tokenizer.json or vocab.txt")
    p.add_argument("--loss", default="", help="task options, e.g. itc=1,itm=1,mlm=1,alpha=0.4 (pretraining small/tiny "
                   "from scratch: mlm=0.3 unless given)")
    p.add_argument("--scenes-images", type=int, default=2000, help="size of the built-in data")
    p.add_argument("--scenes-seed", type=int, default=0)
    add_image_flags(p)
    p.add_argument("--save-total-limit", type=int, default=None, metavar="N",
                   help="checkpoints to keep, newest first (RUN/checkpoint-STEP/; RUN/latest names the newest) "
                   "(default: 1)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that vlprune wrote (never one "
                   "that holds an input of this command)")
    p.add_argument("--accept-changed-inputs", action="store_true",
                   help="with --resume: continue although an input file changed since the run started")
    add_official_flags(p)
    p.set_defaults(run=run)


def _lr(args) -> float:
    from vlprune.recipes import default_lr

    official = getattr(args, "init_official", None) is not None
    return args.lr if args.lr is not None else default_lr(args.task, args.model, args.init, official)


def build_config(args):
    """The TrainConfig of the command line; with ``--resume`` the run's saved config, checked against what was typed."""
    from vlprune.train import CONFIG_FILE

    out = Path(args.out)
    if args.resume and (out / CONFIG_FILE).is_file():
        return _resume_config(args, out / CONFIG_FILE)
    return _fresh_config(args)


def _fresh_config(args):
    from vlprune.guards import check_lr_mult
    from vlprune.train import TrainConfig

    method = method_config(args)
    if args.model is not None and args.init is not None:
        raise ValueError("give --model or --init, not both (a fine-tuning run takes the init checkpoint's model config)")
    lr_mult = _pairs(args.lr_mult, "--lr-mult")
    check_lr_mult(lr_mult, "--lr-mult")
    return TrainConfig(
        task=args.task, train=_abs(args.train), val=_abs(args.val), images=_abs(args.images),
        model=_abs(args.model) if args.model and Path(args.model).is_file() else args.model or "small",
        init=_abs(args.init), method=method, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, accum=args.accum, lr=_lr(args),
        lr_mult=lr_mult, accept_changed_inputs=bool(getattr(args, "accept_changed_inputs", False)),
        weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip, amp=not args.no_amp,
        seed=args.seed, log_every=args.log_every, ckpt_every=args.ckpt_every, num_workers=args.workers,
        tokenizer=_abs(args.tokenizer), task_options=_task_options(args), scenes_images=args.scenes_images,
        scenes_seed=args.scenes_seed, skip_bad_images=args.skip_bad_images, progress=not args.quiet,
        threads=getattr(args, "threads", None), **image_options(args), shuffle_buffer=args.shuffle_buffer,
        precision=_precision(args), compile=getattr(args, "compile", False),
        grad_checkpointing=bool(getattr(args, "grad_checkpointing", False)),
        **({} if args.save_total_limit is None else {"save_total_limit": args.save_total_limit}),
    )


def _abs(path):
    """A path flag as the resolved absolute path (a run is bound to its files, not to the working directory); tar
    shard patterns keep their braces (only the folder is resolved) and URLs stay as they are."""
    from vlprune.data.shards import is_shard_spec, is_url

    if path is None or is_url(path):
        return path
    if is_shard_spec(path):
        p = Path(path)
        return str(Path(os.path.realpath(p.parent)) / p.name)
    return os.path.realpath(path)


def _precision(args) -> str:
    """--precision when typed (fp32 / bf16 / fp16 on any device), else "auto" (autocast on CUDA unless --no-amp)."""
    return getattr(args, "precision", None) or "auto"


# flag dest -> the TrainConfig field it sets. Whether a resume may change it is train.RESUMABLE_CHANGES's rule (the
# one list, also the API's); the positional task, the method flags and the task options are compared field by field.
FLAG_FIELDS = {"train": "train", "val": "val", "images": "images", "model": "model", "init": "init",
               "batch_size": "batch_size", "accum": "accum", "lr": "lr", "lr_mult": "lr_mult",
               "weight_decay": "weight_decay", "warmup": "warmup", "grad_clip": "grad_clip", "no_amp": "precision",
               "precision": "precision", "seed": "seed", "tokenizer": "tokenizer", "scenes_images": "scenes_images",
               "scenes_seed": "scenes_seed", "skip_bad_images": "skip_bad_images", "shuffle_buffer": "shuffle_buffer",
               "steps": "steps", "epochs": "epochs", "workers": "num_workers", "log_every": "log_every",
               "ckpt_every": "ckpt_every", "threads": "threads", "save_total_limit": "save_total_limit",
               "max_image_pixels": "max_image_pixels", "allow_outside_root": "allow_outside_root",
               "compile": "compile", "grad_checkpointing": "grad_checkpointing", "quiet": "progress",
               "accept_changed_inputs": "accept_changed_inputs"}
METHOD_FLAGS = "--method/--layers/--keep/--option"


def _resumable_dests() -> set:
    from vlprune.train import RESUMABLE_CHANGES

    return {d for d, f in FLAG_FIELDS.items() if f in RESUMABLE_CHANGES}


def resumable_flags() -> list:
    """The flags a resume may change: those whose field is in ``train.RESUMABLE_CHANGES``."""
    return sorted("--" + d.replace("_", "-") for d in _resumable_dests())


def _resume_config(args, path: Path):
    """The saved config with the flags that were typed; a change that ``train.resume_differences`` refuses (a
    field outside ``RESUMABLE_CHANGES``) is refused here too, listing each typed flag with its saved and its new
    value."""
    from vlprune.commands.method_flags import DEST
    from vlprune.config import from_dict, to_dict
    from vlprune.fileio import read_json
    from vlprune.train import TrainConfig, refused_fields

    saved = from_dict(TrainConfig, read_json(path, "run config"), str(path))
    given = getattr(args, "given", None)
    if given is None:  # not from vlprune.cli.main: take the flags that are set and that a resume may change
        given = {dest for dest in _resumable_dests() if getattr(args, dest, None) is not None}
    fresh = _fresh_config(args)
    typed = {dest: FLAG_FIELDS[dest] for dest in given if dest in FLAG_FIELDS}
    changes = {field: getattr(fresh, field) for field in typed.values()}
    changes["task"] = fresh.task
    if DEST in given:
        changes["method"] = fresh.method
    options = {k: v for k, v in fresh.task_options.items()
               if k in _pairs(args.loss, "--loss") or (k in OPTION_FLAGS and k in given)}
    changes["task_options"] = {**saved.task_options, **options}
    if "steps" in changes or "epochs" in changes:
        changes["steps"], changes["epochs"] = fresh.steps, fresh.epochs
    changes["progress"] = not args.quiet
    changes["accept_changed_inputs"] = fresh.accept_changed_inputs  # never inherited from the saved config
    cfg = replace(saved, **changes)
    refused = refused_fields(saved, cfg)
    if refused:
        old, new = to_dict(saved), to_dict(cfg)
        rows = []
        for name in refused:
            if name == "task_options":
                rows += [(f"task option {k}", old[name].get(k), v) for k, v in new[name].items()
                         if old[name].get(k) != v]
            else:
                label = {"task": "task", "method": METHOD_FLAGS}.get(name) or "/".join(
                    "--" + d.replace("_", "-") for d, f in sorted(typed.items()) if f == name) or name
                rows.append((label, old[name], new[name]))
        text = "; ".join(f"{name}: saved {a!r}, given {b!r}" for name, a, b in rows)
        raise ValueError(f"cannot resume {path.parent}: arguments differ from {path} ({text}). Resume with the "
                         f"saved arguments, or train into a new --out; only {', '.join(resumable_flags())} may change")
    return cfg


def _task_options(args) -> dict:
    from vlprune.recipes import default_task_options

    opts = {**default_task_options(args.task, args.model, args.init), **_loss_options(args.task, args.loss)}
    for name, key in (("teacher", "teacher"), ("stage", "stage"), ("answers", "answers"), ("k", "k")):
        v = getattr(args, name, None)
        if v is not None:
            if name in ("teacher", "answers"):
                v = str(Path(v).resolve())
            opts[key] = v
    allowed = {"teacher", "stage", "answers"} if args.task in ("vqa", "nlvr2", "ve") else set()
    allowed |= {"k"} if args.task == "retrieval" else set()
    bad = [k for k in ("teacher", "stage", "answers", "k") if k in opts and k not in allowed]
    if bad or (args.task != "vqa" and "answers" in opts):
        raise ValueError(f"--{(bad or ['answers'])[0]} does not apply to task {args.task!r}")
    return opts


def _init_from_official(args) -> None:
    """Convert --init-official into OUT-official-init (or --official-dir) and fine-tune from it as --init; a
    --resume reuses the converted directory."""
    from vlprune.distributed import rank
    from vlprune.models.build import CONFIG_NAME, read_config
    from vlprune.models.official import LoadReport

    out = Path(args.out)
    dest = Path(args.official_dir) if args.official_dir else out.with_name(out.name + "-official-init")
    if args.resume and (dest / CONFIG_NAME).is_file():
        report = LoadReport(args.format, "", args.init_official, method=read_config(dest).get("method"))
    elif rank() == 0:
        report = convert(args, dest)
    else:  # pragma: no cover - DDP: rank 0 converts
        raise ValueError("under torchrun, convert first: run 'vlprune train' with --init-official on one process, "
                         "then --init the converted directory")
    use_reported_method(args, report)
    args.init = str(dest)
    args.tokenizer = None  # the converted model's own: the --tokenizer vocabulary with the official text cleaning


def run(args) -> int:
    from vlprune.distributed import rank
    from vlprune.train import train

    from vlprune.data.shards import is_shard_spec

    if args.train is not None and not is_shard_spec(args.train) and not Path(args.train).is_file():
        raise FileNotFoundError(f"annotation file not found: {args.train}")
    if args.images is not None and not Path(args.images).is_dir():
        raise FileNotFoundError(f"image root directory not found: {args.images}")
    for flag, path in (("--val", args.val), ("--answers", args.answers)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} file not found: {path}")
    if check_official_flags(args):
        _init_from_official(args)
    for flag, path in (("--init", args.init), ("--teacher", args.teacher)):
        if path is not None:
            from vlprune.models.build import checkpoint_dir

            checkpoint_dir(path)
    cfg = build_config(args)
    try:
        res = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    except Exception as e:
        step = getattr(e, "saved_step", None)
        if step is not None and rank() == 0:
            print(f"vlprune train: {args.out} holds the checkpoint of step {step}; once the cause is fixed, continue "
                  f"with: vlprune train {cfg.task} --out {shlex.quote(str(args.out))} --resume", file=sys.stderr)
        raise
    if rank() == 0:
        first, last = res["first"] or {}, res["last"] or {}
        skip = {"step", "epoch", "lr", "samples_per_s", "skipped", "time"}
        parts = [f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in first if k not in skip and k in last]
        print(f"{'interrupted' if res['interrupted'] else 'trained'} {res['steps']}/{res['total_steps']} steps; "
              + "; ".join(parts))
        if res.get("val"):
            print("validation: " + ", ".join(f"{k} {v:.2f}" for k, v in res["val"].items()))
        if res["skipped"]:
            print(f"skipped {res['skipped']} sample(s) with bad images")
        print(f"run directory: {res['out']} (metrics.jsonl, checkpoint-STEP/, model/, tokenizer/)")
        if res["interrupted"]:
            print(f"resume with: vlprune train {cfg.task} --out {shlex.quote(str(args.out))} --resume "
                  f"--threads {res['threads']}")
    return 128 + res["signal"] if res["interrupted"] else 0  # 130 SIGINT, 143 SIGTERM
