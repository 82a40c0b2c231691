"""``vlprune bench``: FLOPs, tokens per layer, throughput, latency, memory and speed-up of reduction methods.

    vlprune bench --model albef-base --methods none,trips,elip,evit,tome --image-size 384 --text-len 40
    vlprune bench --model tiny --method trips --layers 2,3 --keep 0.7 --json
    vlprune bench --model albef-base --image-size 256 --train --mem-budget 16

Progress goes to stderr; the table (or one JSON object per method with ``--json``) to stdout.
"""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure FLOPs, throughput, latency and memory of reduction methods")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="tiny", help="model preset or config JSON (random weights; default tiny)")
    src.add_argument("--checkpoint", default=None, help="a run directory saved by vlprune (instead of --model)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--method", default=None, help="one method, configured with --layers/--keep/--options")
    m.add_argument("--methods", default=None,
                   help="comma-separated methods (default: none); each with its defaults or with settings after "
                        "colons, e.g. none,trips:layers=5/10:keep=0.7,elip:lookahead=false")
    p.add_argument("--layers", default=None, help="1-based layers for --method, e.g. 5,10")
    p.add_argument("--keep", default=None, help="keep rate for --method, or one per layer: 0.7 or 0.9,0.7")
    p.add_argument("--options", default=None, help='method options for --method as JSON, e.g. \'{"r": 8}\'')
    p.add_argument("--image-size", type=int, default=None, help="input size (position embeddings interpolated)")
    p.add_argument("--text-len", type=int, default=40, help="caption length in tokens (random ids; default 40)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--batch-size", type=int, default=None, help="batch for throughput (default 8 CPU / 32 GPU)")
    b.add_argument("--max-batch", action="store_true", help="use the largest batch that fits (CPU: needs --mem-budget)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs and tokens only, no timing")
    p.add_argument("--train", action="store_true", help="measure a pre-training step (ITC+ITM+MLM, backward, momentum)")
    p.add_argument("--mem-budget", type=float, default=None, metavar="GB",
                   help="memory budget for the largest-batch search (GB)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", action="store_true", help="print one JSON object per method instead of the table")
    p.set_defaults(run=run)


def _ints(text: str, what: str):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def _floats(text: str, what: str):
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} must be a number or comma-separated numbers, got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def parse_method_spec(spec: str):
    """``name[:key=value]...`` -> ReduceConfig. ``layers=5/10`` and ``keep=0.7`` (or ``keep=0.9/0.7``) set the
    layers and keep rate; any other key is a method option, its value read as JSON when it parses (``false``,
    ``8``, ``0.5``) and as a string otherwise."""
    from vlprune.reduce.registry import ReduceConfig

    name, *parts = spec.split(":")
    layers, keep, options = None, None, {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"method setting {part!r} in {spec!r} must be key=value (e.g. trips:keep=0.7)")
        if key == "layers":
            layers = _ints(value.replace("/", ","), f"layers in {spec!r}")
        elif key == "keep":
            keep = _floats(value.replace("/", ","), f"keep in {spec!r}")
        else:
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
    return ReduceConfig(name.strip(), layers=layers, keep=keep, options=options)


def method_configs(args):
    """ReduceConfigs from --method/--layers/--keep/--options or --methods."""
    from vlprune.reduce.registry import ReduceConfig

    one_only = [f for f in ("layers", "keep", "options") if getattr(args, f) is not None]
    if args.method is None:
        if one_only:
            raise ValueError(f"--{'/--'.join(one_only)} configure a single --method, not --methods")
        names = [n.strip() for n in (args.methods or "none").split(",") if n.strip()]
        if not names:
            raise ValueError(f"--methods needs at least one method name, got {args.methods!r}")
        return [parse_method_spec(n) for n in names]
    options = {}
    if args.options is not None:
        try:
            options = json.loads(args.options)
        except json.JSONDecodeError as e:
            raise ValueError(f"--options must be a JSON object, got {args.options!r} ({e})") from None
        if not isinstance(options, dict):
            raise ValueError(f"--options must be a JSON object, got {args.options!r}")
    layers = None if args.layers is None else _ints(args.layers, "--layers")
    keep = None if args.keep is None else _floats(args.keep, "--keep")
    return [ReduceConfig(args.method, layers=layers, keep=keep, options=options)]


def run(args) -> int:
    from vlprune.bench.runner import BenchSettings, format_table, run_bench

    settings = BenchSettings(
        model=args.model, checkpoint=args.checkpoint, image_size=args.image_size, text_len=args.text_len,
        batch_size=args.batch_size, max_batch=args.max_batch, device=args.device, flops_only=args.flops_only,
        train=args.train, mem_budget_gb=args.mem_budget, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
    )
    methods = method_configs(args)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = run_bench(settings, methods, progress)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
    return 0
