"""``vlprune protocols``: the seed methods under their own papers' protocols (see ``vlprune.protocols`` and
docs/protocols.md)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from vlprune.protocols import PROFILES, PROTOCOLS

    p = sub.add_parser(
        "protocols",
        help="run each seed method's own protocol (TRIPS / ELIP pre-training 2x2, TiP two stages on ViLT, LAPS "
        "retrieval, DynamicViT) on the built-in benchmark at equal budgets, and write a report (continues a run)",
        description="Runs the planned stages one at a time; each is kept under OUT/<stage>/ once finished, so the same "
        "command continues where it stopped (an interrupted training stage resumes from its checkpoint). Profiles: "
        "quick (a smoke run, meaningless numbers), default (one seed), full (3 seeds). --threads: torch threads "
        "(default 1 here).",
    )
    p.add_argument("protocols", nargs="*", metavar="PROTOCOL",
                   help=f"the protocols to run (default: all): {', '.join(PROTOCOLS)}")
    p.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)} (default: default)")
    p.add_argument("--out", default="runs/protocols", help="output directory (default runs/protocols); an existing "
                   "protocols directory is continued")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first and start over")
    p.add_argument("--plan", action="store_true", help="print the planned stages and the expected time, run nothing")
    p.add_argument("--rate", type=float, default=25.0, help="with --plan: trained samples/s of the unpruned "
                   "two-stream model on this machine (default 25: measured on 1 thread of a loaded 2-core machine)")
    p.set_defaults(run=run)


def run(args) -> int:
    from vlprune.protocols import get_profile, run_protocols
    from vlprune.protocols.profiles import check_protocols

    prof = get_profile(args.profile)
    protocols = check_protocols(args.protocols)
    threads = 1 if args.threads is None else args.threads
    if isinstance(threads, bool) or threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")

    if args.plan:
        return print_plan(prof, protocols, args.rate)

    def say(msg: str) -> None:
        if not args.quiet:
            from tqdm import tqdm

            tqdm.write(f"[protocols] {msg}", file=sys.stderr)

    try:
        report = run_protocols(args.out, protocols, prof, overwrite=args.overwrite, threads=threads,
                               quiet=args.quiet, say=say)
    except KeyboardInterrupt:
        print(f"[protocols] interrupted: run the same command again to continue (finished stages and the checkpoint "
              f"of an interrupted training stage are kept in {args.out})", file=sys.stderr)
        raise
    import json

    results = json.loads(report.with_name("results.json").read_text())
    for name, r in results["results"].items():
        print(f"{name}: {r['verdict']}\n")
    print(f"report: {report}  (and {report.with_suffix('.html')})")
    return 0


def print_plan(prof, protocols, rate: float) -> int:
    """The stages in run order (task, model, steps x batch, method, what each starts from and distils from) and
    the expected hours per protocol at ``rate`` samples/s."""
    from vlprune.protocols import build_plan
    from vlprune.protocols.run import estimate

    if not rate > 0:
        raise ValueError(f"--rate must be > 0 samples/s, got {rate}")
    plan = build_plan(prof, protocols)
    for t in plan.trains.values():
        method = (t.method or {}).get("name", "none")
        print(f"{t.name:24s} {t.task:9s} {t.arch:6s} {t.steps:5d} x {t.batch_size:<3d} method {method:10s} "
              f"from {t.init or 'scratch'}" + (f", distilled from {t.teacher}" if t.teacher else ""))
    print(f"{len(plan.evals)} evaluations; rows: {len(plan.rows)}")
    for k, v in estimate(plan, rate).items():
        print(f"expected {k}: {v / 3600:.2f} h")
    return 0
