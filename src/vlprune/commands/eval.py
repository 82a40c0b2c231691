"""``vlprune eval TASK``: evaluate a fine-tuned run on a test file, optionally with another method than it was
trained with (e.g. EViT or TRIPS applied at inference to an unpruned model). The checkpoint is only read.

    vlprune eval vqa --checkpoint runs/vqa --test data/vqa_test.json --images data --method trips --layers 3,5 --keep 0.7 --json
    torchrun --nproc_per_node=2 -m vlprune eval retrieval --checkpoint runs/ret --json   # scenes test split of the run

With ``--json`` the last line of stdout is one JSON object: the task's metrics plus "method", "examples",
"gflops" (image-encoder GFLOPs per example) and "image_tokens" (mean image tokens after the image encoder).
"""

from __future__ import annotations

import json
from pathlib import Path

from .method_flags import add_method_flags, method_config

TASKS = ("retrieval", "vqa", "nlvr2", "ve")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a fine-tuned run on a downstream task (any method at inference)")
    p.add_argument("task", choices=TASKS, help="the downstream task")
    p.add_argument("--checkpoint", required=True, help="run directory (or a saved model directory)")
    p.add_argument("--test", default=None, help="test annotation JSON (default: the run's scenes test split)")
    p.add_argument("--images", default=None, help="image root (default: the test file's folder)")
    add_method_flags(p, method_help="reduction method at inference (default: the trained one; none = off)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--k", type=int, default=128, help="retrieval: ITM re-ranking candidates")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--predictions", default=None,
                   help="write per-example predictions to this JSON file (vqa: [{question_id, answer}]; nlvr2/ve: labels)")
    p.set_defaults(run=run)


def _method(args):
    """The method to evaluate with: "saved" (the trained one) without --method, else the configured one."""
    rc = method_config(args)
    return "saved" if rc is None else rc


def _test_file(args, ckpt_run: Path, task) -> Path:
    if args.test is not None:
        path = Path(args.test)
        if not path.is_file():
            raise FileNotFoundError(f"test annotation file not found: {path}")
        return path
    path = ckpt_run / "data" / task.scenes_test
    if not path.is_file():
        raise FileNotFoundError(f"no --test given and {path} does not exist (the run was not trained on scenes data)")
    return path


def run(args) -> int:
    import torch

    from vlprune.data.images import ImageLoader
    from vlprune.data.tokenizer import TextTokenizer
    from vlprune.models.build import load_pretrained, read_config
    from vlprune.tasks.base import get_task
    from vlprune.tasks.evaluation import evaluate
    from vlprune.tasks.finetune import checkpoint_dir, tokenizer_dir
    from vlprune.runtime import check_precision, maybe_compile, precision_context, thread_info
    from vlprune.train import setup_distributed

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.predictions is not None and args.task == "retrieval":
        raise ValueError("--predictions is for vqa, nlvr2 and ve")
    ckpt = checkpoint_dir(args.checkpoint)
    meta = read_config(ckpt)
    task = get_task(args.task, **({"k": args.k} if args.task == "retrieval" else {}))
    test = _test_file(args, ckpt.parent if ckpt.name == "model" else ckpt, task)
    if args.images is not None and not Path(args.images).is_dir():
        raise FileNotFoundError(f"image root directory not found: {args.images}")
    entries = task.load_test(test)
    tdir = tokenizer_dir(ckpt)
    if tdir is None:
        raise FileNotFoundError(f"no tokenizer found with the checkpoint {ckpt}")
    method = _method(args)
    rank, world, device, started = setup_distributed()
    try:
        model = load_pretrained(ckpt, method=method).to(device).eval()
        precision = check_precision(getattr(args, "precision", None) or "fp32", device)
        compiled = maybe_compile(model, getattr(args, "compile", False), device)
        if args.task != "retrieval" and args.task not in model.task_heads:
            raise ValueError(f"the checkpoint {ckpt} has no {args.task!r} head (heads: {list(model.task_heads)}); "
                             f"fine-tune it with 'vlprune train {args.task}' first")
        task.restore(meta, model)
        tok = TextTokenizer.from_dir(tdir)
        tok.check_model(model.cfg.text)
        loader = ImageLoader.for_model(model.cfg.vision, Path(args.images) if args.images else test.parent)
        with torch.inference_mode(), precision_context(precision, device):
            metrics, info = evaluate(task, model, entries, loader, tok, args.batch_size, device, rank, world,
                                     progress=not args.quiet)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    preds = info.pop("predictions", None)
    if args.predictions is not None:
        Path(args.predictions).write_text(json.dumps(task.prediction_records(entries, preds)))
    rc = model.method_config
    name = "none" if rc is None else rc.name
    print(f"{args.task} on {test} ({info['examples']} examples), method {name if rc is None else rc.to_dict()}")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    print(f"  image-encoder GFLOPs per example {info['gflops']:.4f}, image tokens after the encoder {info['image_tokens']:.1f}")
    if args.json:
        out = {**metrics, "method": name, "method_config": None if rc is None else rc.to_dict(),
               "examples": info["examples"], "gflops": info["gflops"], "image_tokens": info["image_tokens"],
               "precision": precision, "compiled": compiled, **thread_info(),
               **{k: v for k, v in info.items() if k not in ("examples", "gflops", "image_tokens")}}
        print(json.dumps(out))
    return 0
