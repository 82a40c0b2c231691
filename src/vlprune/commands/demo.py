"""``vlprune demo``: the main job on the built-in data (see ``vlprune.demo``)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="generate scenes data, pre-train, fine-tune VQA and retrieval with each method, evaluate, benchmark, "
        "and write a report",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="the smallest version (about 2 minutes on 2 CPU cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--methods", default=None, help="comma-separated subset of none,trips,elip,evit,tome,random")
    p.set_defaults(run=run)


def run(args) -> int:
    from vlprune.demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    run_demo(args.out, quick=args.quick, overwrite=args.overwrite, methods=methods)
    return 0
