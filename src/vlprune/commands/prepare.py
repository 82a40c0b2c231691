"""``vlprune data prepare NAME --root DIR --out DIR``: a public release (COCO, Flickr30k, VQAv2, VG QA, NLVR2,
SNLI-VE, RefCOCO+, CC3M, CC12M, SBU, VG captions, the 4M / 14M mixtures) to the project's formats
(``vlprune.prepare``). ``vlprune data prepare --list`` lists the targets and the layout each one reads."""

from __future__ import annotations

import sys


def add_subparser(dsub) -> None:
    from vlprune.prepare import CHECKS, TARGETS

    p = dsub.add_parser("prepare", help="convert a downloaded public release (coco, vqav2, cc3m, ...) to the "
                        "project's formats")
    p.add_argument("name", nargs="?", choices=list(TARGETS), metavar="NAME",
                   help=f"target: {', '.join(TARGETS)}")
    p.add_argument("--list", action="store_true", help="list the targets with the layout each reads, and exit")
    p.add_argument("--root", default=None, help="folder holding the release as its publisher ships it")
    p.add_argument("--out", default=None, help="output folder (the files go to OUT/NAME/)")
    p.add_argument("--split", action="append", default=None, help="only this split (repeatable; default: all)")
    p.add_argument("--check", choices=CHECKS, default="exists",
                   help="image check: exists (present, not empty), decode (decoded in full), none")
    p.add_argument("--strict", action="store_true", help="counts that differ from the full release are an error")
    p.add_argument("--redo", action="store_true", help="redo splits that are already prepared")
    p.add_argument("--answers", type=int, default=None, help="vqav2: size of answer_list.json (default 3128)")
    p.add_argument("--answer-list", default=None, help="vg-qa: keep only QAs whose answer is in this JSON list")
    p.add_argument("--shard-size", type=int, default=None, help="pre-training sets: samples per shard (default 10000)")
    p.add_argument("--workers", type=int, default=0, help="pre-training sets: processes decoding images for shards")
    p.set_defaults(run=run)


def run(args) -> int:
    from vlprune.errors import CLIError
    from vlprune.prepare import TARGETS, prepare

    if args.list:
        for name, t in TARGETS.items():
            print(f"{name:14s} {t.title}: {t.layout}")
        return 0
    if args.name is None or args.root is None or args.out is None:
        raise CLIError("give NAME, --root and --out (or --list)")
    if args.shard_size is not None and args.shard_size < 1:
        raise CLIError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    options = {k: v for k, v in (("answers", args.answers), ("answer_list", args.answer_list),
                                 ("shard_size", args.shard_size)) if v is not None}
    if args.workers:
        options["workers"] = args.workers
    bad = [k for k in options if k not in TARGETS[args.name].options and k != "workers"]
    if bad:
        raise CLIError(f"--{bad[0].replace('_', '-')} does not apply to target {args.name!r}")
    state = prepare(args.name, args.root, args.out, args.split, args.check, args.strict, args.redo,
                    progress=not args.quiet, options=options, say=print)
    print(f"{args.name}: {len(state['splits'])} split(s) in {args.out}/{args.name}/ (prepared.json records them)")
    return 0
