"""``vlprune reproduce NAME``: run a paper recipe (``vlprune.paper_recipes``) stage by stage on the data that
``vlprune data prepare`` wrote; ``--dry-run`` prints the plan and its estimated cost, ``--max-steps N`` runs every
stage for N steps (a miniature run, with ``--model tiny`` in seconds)."""

from __future__ import annotations

import os
from pathlib import Path


def add_parser(sub) -> None:
    from vlprune.paper_recipes import list_recipes
    from vlprune.paper_recipes.cost import MFU

    p = sub.add_parser("reproduce", help="run a paper's recipe (pre-training, fine-tunes) on prepared data")
    p.add_argument("name", nargs="?", metavar="NAME", help=f"recipe: {', '.join(list_recipes())} (or a recipe .json)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--data", default=None, help="the --out of `vlprune data prepare` (needed to run; a dry run "
                   "without it counts the full releases)")
    p.add_argument("--out", default=None, help="recipe run directory: one sub-directory per stage (default: runs/NAME)")
    p.add_argument("--init", default=None, help="the checkpoint that stages with init 'checkpoint' start from")
    p.add_argument("--stage", action="append", default=None, help="run only this stage (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, data, steps, checkpoints, cost)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="miniature run: N steps per stage")
    p.add_argument("--model", default=None, help="with --max-steps: another model (a preset or config JSON; 'tiny' "
                   "= the tiny preset in the recipe's architecture)")
    p.add_argument("--batch-size", type=int, default=None, help="per process (default: the recipe's global batch "
                   "divided by the processes; with --max-steps: 2)")
    p.add_argument("--mfu", type=float, default=MFU, help="assumed model FLOP utilisation for the time estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps")
    p.add_argument("--tokenizer", default=None, help="stages from scratch: tokenizer directory (e.g. BERT's "
                   "vocab.txt); default: trained on the captions")
    p.set_defaults(run=run)


def miniature_model(name: str, arch: str, out: Path):
    """(model argument, ModelConfig) of a miniature run: ``tiny`` follows the recipe's architecture."""
    import json

    import vlprune
    from vlprune.config import override, to_dict

    cfg = vlprune.load_preset(name)
    if name == "tiny" and arch == "vilt":
        cfg = override(cfg, arch="vilt", **{"text.layers": 0, "fusion_layers": 0, "use_momentum": False})
        path = out / "data" / "model-tiny-vilt.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_dict(cfg), indent=1))
        return str(path), cfg
    if cfg.arch != arch:
        raise ValueError(f"--model {name} is a {cfg.arch} model; the recipe trains a {arch} model")
    return name, cfg


def run(args) -> int:
    import vlprune
    from vlprune.errors import CLIError
    from vlprune.paper_recipes import list_recipes, load_recipe
    from vlprune.paper_recipes.cost import detect_hardware
    from vlprune.paper_recipes.plan import format_plan, make_plan

    if args.list:
        for name in list_recipes():
            r = load_recipe(name)
            print(f"{name:16s} {r['title']}")
        return 0
    if args.name is None:
        raise CLIError("give a recipe NAME (or --list)")
    if args.max_steps is not None and args.max_steps < 1:
        raise CLIError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.model is not None and args.max_steps is None:
        raise CLIError("--model is for miniature runs (--max-steps); a full run trains the recipe's model")
    if not 0 < args.mfu <= 1:
        raise CLIError(f"--mfu must be in (0, 1], got {args.mfu}")
    recipe = load_recipe(args.name)
    out = Path(args.out or f"runs/{recipe['name']}")
    data = Path(args.data) if args.data else None
    if data is not None and not data.is_dir():
        raise CLIError(f"--data {data} is not a directory (the --out of `vlprune data prepare`)")
    arch = vlprune.load_preset(recipe["model"]).arch
    miniature = args.max_steps is not None
    if miniature and args.model:
        model, model_cfg = miniature_model(args.model, arch, out)
    else:
        model, model_cfg = recipe["model"], vlprune.load_preset(recipe["model"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plans = make_plan(recipe, data, out, model_cfg, world, args.max_steps, args.mfu, with_cost=not miniature)
    if args.dry_run:
        print(format_plan(recipe, plans, detect_hardware(), args.mfu, miniature))
        return 0
    if data is None:
        raise CLIError("give --data (the --out of `vlprune data prepare`) to run; --dry-run plans without it")
    from vlprune.paper_recipes.run import run_plan

    options = {"seed": args.seed, "num_workers": args.workers, "ckpt_every": args.ckpt_every,
               "tokenizer": args.tokenizer, "progress": not args.quiet, "threads": args.threads}
    batch = args.batch_size if args.batch_size is not None else (2 if miniature else None)
    results = run_plan(recipe, plans, data, out, model, model_cfg, args.init, world, miniature, batch,
                       args.stage, options, say=print)
    done = [k for k, v in results.items() if v != "skipped"]
    print(f"recipe {recipe['name']}: trained {len(done)} stage(s), skipped {len(results) - len(done)}; runs in {out}/")
    return 0
