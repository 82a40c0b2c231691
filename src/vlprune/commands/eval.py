"""``vlprune eval TASK``: evaluate a fine-tuned run on a test file, optionally with another method than it was
trained with (e.g. EViT or TRIPS applied at inference to an unpruned model). The checkpoint is only read.

    vlprune eval vqa --checkpoint runs/vqa --test data/vqa_test.json --images data --method trips --layers 3,5 --keep 0.7 --json
    torchrun --nproc_per_node=2 -m vlprune eval retrieval --checkpoint runs/ret --json   # scenes test split of the run

With ``--json`` the last line of stdout is one JSON object: the task's metrics plus "method", "examples",
"gflops" (image-encoder GFLOPs per example) and "image_tokens" (mean image tokens after the image encoder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlprune.tasks.evaluation import EVAL_TASKS, check_task, checkpoint_tasks  # noqa: F401  (re-exported)

from .method_flags import add_image_flags, add_method_flags, image_options, method_config
from .official import add_official_flags, check_official_flags, convert

TASKS = EVAL_TASKS + ("grounding",)
log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a fine-tuned run on a downstream task (any method at inference)")
    p.add_argument("task", choices=TASKS, help="the downstream task")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="run directory (or a saved model directory)")
    src.add_argument("--hf", metavar="DIR_OR_ID", help="a Hugging Face model with its processor, patched by vlprune.patch (vqa, retrieval)")
    p.add_argument("--test", default=None, help="test annotation JSON (default: the run's scenes test split)")
    p.add_argument("--images", default=None, help="image root (default: the test file's folder)")
    add_method_flags(p, method_help="reduction method at inference (default: the trained one; none = off)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--k", type=int, default=128, help="retrieval: ITM re-ranking candidates")
    p.add_argument("--max-pairs", type=int, default=None,
                   help="retrieval --hf with ViLT or BridgeTower (every image-caption pair scored): refuse more pairs "
                   "than this (default 20000)")
    p.add_argument("--gallery-chunk", type=int, default=0,
                   help="retrieval over a large gallery in bounded memory: images are encoded and searched in chunks "
                   "of this many (e.g. 16384); 0 = all in memory (default)")
    p.add_argument("--search", choices=("auto", "torch", "faiss"), default="auto",
                   help="with --gallery-chunk: top-k search backend (auto = faiss when installed)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--predictions", default=None,
                   help="write per-example predictions to this JSON file (vqa: [{question_id, answer}]; nlvr2/ve: labels)")
    p.add_argument("--overwrite-predictions", action="store_true", help="replace an existing --predictions file")
    add_official_flags(p, eval_flags=True)
    add_image_flags(p)
    from .caption import add_caption_flags

    add_caption_flags(p)
    p.set_defaults(run=run)


def _method(args):
    """The method to evaluate with: "saved" (the trained one) without --method, else the configured one."""
    rc = method_config(args)
    return "saved" if rc is None else rc


def run(args) -> int:
    from vlprune.config import check_pos_int
    from vlprune.models.build import checkpoint_dir

    check_pos_int("--batch-size", args.batch_size)
    if args.gallery_chunk < 0:
        raise ValueError(f"--gallery-chunk must be >= 0, got {args.gallery_chunk}")
    if args.predictions is not None and args.task == "retrieval":
        raise ValueError("--predictions is for vqa, nlvr2 and ve")
    from vlprune.guards import check_output_file, eval_inputs

    check_output_file(args.predictions, args.overwrite_predictions, "--predictions", eval_inputs(args))
    if args.task == "grounding":  # vlprune.commands.caption
        from .caption import run_grounding

        return run_grounding(args)
    if args.task == "caption" and args.hf is not None:
        from .caption import run_hf_caption

        return run_hf_caption(args)
    if check_official_flags(args):
        if args.hf is not None:
            raise ValueError("give --hf or --init-official, not both")
        return _run_official(args)
    if args.hf is not None:  # a Hugging Face model (vlprune.tasks.hf_vqa)
        from .hf_eval import run_hf

        return run_hf(args)
    if args.checkpoint is None:
        raise ValueError("give --checkpoint (a run or saved model directory), --hf DIR_OR_ID (a Hugging Face model) "
                         "or --init-official PATH --format F")
    return _run(args, checkpoint_dir(args.checkpoint))


def _run_official(args) -> int:
    """Evaluate an official checkpoint: converted into a temporary model directory, then as --checkpoint."""
    import tempfile

    if args.test is None:
        raise ValueError("--init-official needs --test (an annotation file of the task)")
    answers = None
    if args.answers is not None:
        answers = json.loads(Path(args.answers).read_text())
        if not isinstance(answers, list):
            raise ValueError(f"--answers {args.answers} must hold a JSON list of answers")
    with tempfile.TemporaryDirectory(prefix="vlprune-official-") as d:
        convert(args, Path(d), answers)  # without --method, the saved (the format's own) method runs
        return _run(args, Path(d))


def _task_options(args) -> dict:
    if args.task == "retrieval":
        return {"k": args.k, "gallery_chunk": args.gallery_chunk, "search": args.search}
    if args.task == "caption":
        from .caption import caption_options

        return caption_options(args)
    return {}


def _run(args, ckpt: Path) -> int:
    from vlprune.runtime import thread_info
    from vlprune.guards import check_finite_weights
    from vlprune.tasks.evaluation import evaluate_run

    r = evaluate_run(ckpt, args.task, args.test, method=_method(args), images=args.images,
                     batch_size=args.batch_size, task_options=_task_options(args),
                     precision=getattr(args, "precision", None) or "fp32", compile=getattr(args, "compile", False),
                     skip_bad_images=args.skip_bad_images, progress=not args.quiet,
                     check_model=check_finite_weights, **image_options(args))
    if r.rank != 0:
        return 0
    if args.predictions is not None:
        Path(args.predictions).write_text(json.dumps(r.records()))
    info, dropped, test = dict(r.info), r.dropped, r.test
    metrics = r.metrics
    info.pop("predictions", None)
    rc = r.method
    name = "none" if rc is None else rc.name
    print(f"{args.task} on {test} ({info['examples']} examples), method {name if rc is None else rc.to_dict()}")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    print(f"  image-encoder GFLOPs per example {info['gflops']:.4f}, image tokens after the encoder {info['image_tokens']:.1f}")
    if dropped:
        print(f"  skipped {len(dropped)} example(s) with bad images (the metrics are over the other {info['examples']}); "
              f"first: {dropped[0]}")
    if args.json:
        out = {**metrics, "method": name, "method_config": None if rc is None else rc.to_dict(),
               "examples": info["examples"], "skipped": len(dropped), "gflops": info["gflops"], "image_tokens": info["image_tokens"],
               "precision": r.precision, "compiled": r.compiled, **thread_info(),
               **{k: v for k, v in info.items() if k not in ("examples", "gflops", "image_tokens")}}
        print(json.dumps(out))
    return 0
