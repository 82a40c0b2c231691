"""``vlprune demo``: the main job on the built-in data (see ``vlprune.demo`` and docs/demo.md)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="generate scenes data, fine-tune VQA and retrieval, sweep every method's accuracy against cost, "
        "and write a report (continues an existing run)",
        description="Runs the demo's stages one at a time; each is kept under OUT/<stage>/ once finished, so running "
        "the same command again continues where it stopped. Profiles: the default (its budget: 20 minutes on 2 idle CPU cores), "
        "--quick (a smoke run, meaningless accuracies) and --full (longer, several seeds).",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo); an existing demo "
                   "directory is continued")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the smoke-run profile (under 2 minutes; for the tests)")
    size.add_argument("--full", action="store_true", help="the long profile (more data and steps, 3 seeds)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first and start over")
    # --threads (default here: the cores available) and --quiet (no bars, no stage messages) are global flags
    p.set_defaults(run=run)


def run(args) -> int:
    from vlprune.demo import run_demo
    from vlprune.demo.report import MAIN_COLUMNS
    from vlprune.viz.report import markdown_table

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    profile = "quick" if args.quick else "full" if args.full else "default"

    def say(msg: str) -> None:
        if not args.quiet:
            from tqdm import tqdm

            tqdm.write(f"[demo] {msg}", file=sys.stderr)

    if args.overwrite and args.quiet:
        print(f"[demo] --overwrite: deleting {args.out}", file=sys.stderr)
    try:
        report = run_demo(args.out, profile=profile, overwrite=args.overwrite, threads=args.threads,
                          quiet=args.quiet, say=say)
    except KeyboardInterrupt:
        print(f"[demo] interrupted: run the same command again to continue (finished stages and the checkpoint of "
              f"an interrupted training stage are kept in {args.out})", file=sys.stderr)
        raise
    import json

    results = json.loads(report.with_name("results.json").read_text())
    print(markdown_table(results["rows"], MAIN_COLUMNS))
    print()
    for s in results["sentences"]:
        print(s)
    print(f"\nreport: {report}  (and {report.with_suffix('.html')})")
    return 0
