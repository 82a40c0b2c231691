"""``vlprune bench``: FLOPs, tokens per layer, throughput, latency, memory and speed-up of reduction methods.

    vlprune bench --model albef-base --method none --method trips --method elip --method evit --method tome \
        --image-size 384 --text-len 40
    vlprune bench --model tiny --method trips --layers 2,3 --keep 0.7 --method tome --option r=3 --json
    vlprune bench --model albef-base --image-size 256 --train --mem-budget 16

Each ``--method`` is configured by the ``--layers``/``--keep``/``--option`` that follow it (``method_flags``);
"none" (the baseline of the speed-ups) is added first when missing.

Progress goes to stderr; the table (or one JSON object per method with ``--json``) to stdout.
"""

from __future__ import annotations

import json
import sys

from .method_flags import add_method_flags, method_configs


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure FLOPs, throughput, latency and memory of reduction methods")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="tiny", help="model preset or config JSON (random weights)")
    src.add_argument("--checkpoint", default=None, help="a run directory saved by vlprune (instead of --model)")
    src.add_argument("--hf", default=None, metavar="DIR_OR_ID", help="a Hugging Face model, patched by vlprune.patch")
    src.add_argument("--hf-arch", default=None, help="a real HF architecture with random weights: blip-base, clip-b16, vilt-b32, bridgetower-base; vision-language LLMs: llava-1.5-0.5b, llava-1.5-7b, llava-small")
    p.add_argument("--new-tokens", type=int, default=16, help="vision-language LLMs: tokens generated for the decode speed")
    add_method_flags(p, several=True, method_help="a method to measure; none (the baseline) is always measured")
    p.add_argument("--image-size", type=int, default=None, help="input size (position embeddings interpolated)")
    p.add_argument("--text-len", type=int, default=40, help="caption length in tokens (random ids)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--batch-size", type=int, default=None, help="batch for throughput (default 8 CPU / 32 GPU)")
    b.add_argument("--max-batch", action="store_true", help="use the largest batch that fits (CPU: within --mem-budget, default half the free memory)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs and tokens only, no timing")
    p.add_argument("--train", action="store_true", help="measure training steps (--train-task), interleaved over the methods")
    p.add_argument("--train-task", choices=("pretrain", "vqa"), default="pretrain",
                   help="with --train: pretrain (ITC+ITM+MLM, momentum, backward, AdamW) or vqa (VQA head, BCE)")
    p.add_argument("--mem-budget", type=float, default=None, metavar="GB",
                   help="memory budget for the largest-batch search (GB)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--reference", action="store_true",
                   help="also time the same ALBEF model built from plain PyTorch layers with no reduction slot (the "
                   "slots' overhead; with --train: forward + backward of the ITM loss on both)")
    p.add_argument("--profile", action="store_true",
                   help="per-op torch.profiler tables of one forward per method (where the time goes), no timing table")
    p.add_argument("--profile-rounds", type=int, default=1, help="profiled forwards per method with --profile")
    p.add_argument("--profile-top", type=int, default=15, help="ops listed in the --profile top-ops table")
    p.add_argument("--json-out", default=None, metavar="FILE",
                   help="also write one JSON object per method to FILE (the table still goes to stdout)")
    p.add_argument("--json", action="store_true", help="print one JSON object per method instead of the table")
    p.set_defaults(run=run)


def run(args) -> int:
    from vlprune.bench.runner import BenchSettings, format_table, run_bench

    settings = BenchSettings(
        model=args.model, checkpoint=args.checkpoint, image_size=args.image_size, text_len=args.text_len,
        batch_size=args.batch_size, max_batch=args.max_batch, device=args.device, flops_only=args.flops_only,
        train=args.train, mem_budget_gb=args.mem_budget, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
        precision=args.precision or "fp32", compile=args.compile, train_task=args.train_task,
        reference=args.reference,
    )
    from vlprune.reduce.registry import ReduceConfig

    methods = method_configs(args, several=True) or [ReduceConfig("none")]

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    progress.bars = not args.quiet  # progress bars over the timed rounds (vlprune.bench.throughput.calls_bar)

    if args.hf_arch:  # a vision-language LLM: prefill, decode and KV cache (vlprune.bench.hf_lvlm)
        from vlprune.bench.hf_lvlm import LVLM_ARCHS, run_command as run_lvlm

        if args.hf_arch in LVLM_ARCHS:
            return run_lvlm(args, method_configs(args, several=True), progress)
    if args.hf or args.hf_arch:  # a Hugging Face model, patched against unpatched (vlprune.bench.hf)
        from vlprune.bench.hf import run_command

        return run_command(args, method_configs(args, several=True), progress)
    if args.profile:
        from vlprune.bench.runner import profile_bench

        rows, text = profile_bench(settings, methods, progress, rounds=args.profile_rounds, top=args.profile_top)
        _write_json(args.json_out, rows)
        if args.json:
            for r in rows:
                print(json.dumps(r))
        else:
            print(text)
        return 0
    rows = run_bench(settings, methods, progress)
    _write_json(args.json_out, rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
    return 0


def _write_json(path, rows) -> None:
    if path:
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
