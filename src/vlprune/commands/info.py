"""``vlprune info``: presets, methods, and a model's size."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="list presets and methods; describe a model preset")
    p.add_argument("--model", default=None, help="a preset name or config JSON to describe")
    p.set_defaults(run=run)


def run(args) -> int:
    import vlprune
    from vlprune.config import to_dict

    print("presets:", ", ".join(vlprune.list_presets()))
    print("methods:", ", ".join(vlprune.list_methods()))
    if args.model:
        cfg = vlprune.load_preset(args.model)
        model = vlprune.build_model(cfg)
        n = sum(p.numel() for p in model.parameters())
        print(f"model {args.model}: arch={cfg.arch}, {n / 1e6:.2f}M parameters")
        print(to_dict(cfg))
    return 0
