"""``vlprune info``: presets, methods, and a model's size."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="list presets and methods; describe a model preset")
    p.add_argument("--model", default=None, help="a preset name or config JSON to describe")
    p.add_argument("--methods-table", action="store_true",
                   help="print the methods' declared traits as a Markdown table (as in docs/methods.md)")
    p.set_defaults(run=run)


def describe_method(name: str) -> str:
    """One line from a method's declaration: where it runs, its traits, defaults and options."""
    from vlprune.reduce.registry import get_spec

    spec = get_spec(name)
    where = f"{'/'.join(spec.groups)} slots, {spec.placement}" if spec.groups else spec.placement
    traits = [t for t, on in (("text-guided", spec.text_guided), ("learned", spec.learned),
                              ("stages", spec.stages)) if on]
    parts = [f"{name}: {where}"] + ([", ".join(traits)] if traits else [])
    defaults = [f"{k}={v}" for k, v in (("layers", spec.layers), ("keep", spec.keep)) if v is not None]
    if defaults:
        parts.append("defaults (12 layers) " + " ".join(defaults))
    if spec.options:
        parts.append("options " + ", ".join(f"{k}={o.default!r} ({o.describe()})" for k, o in spec.options.items()))
    return "; ".join(parts)


def methods_table(names=None) -> str:
    """A Markdown table of the methods' declarations (default: every registered method): title, slot groups,
    placement, traits, whether it has operating points for sweeps, and the Hugging Face classes it patches."""
    from vlprune.patch import FAMILIES
    from vlprune.reduce.registry import get_spec, list_methods

    rows = ["| method | title | slot groups | placement | text-guided | learned | sweep points | vlprune.patch |",
            "|---|---|---|---|---|---|---|---|"]
    for name in names if names is not None else list_methods():
        spec = get_spec(name)
        fams = [f.name for f in FAMILIES.values() if any(spec.name in o.methods() for o in f.classes.values())]
        yes = lambda on: "yes" if on else "no"  # noqa: E731
        rows.append(f"| {name} | {spec.title} | {', '.join(spec.groups) or '-'} | {spec.placement} | "
                    f"{yes(spec.text_guided)} | {yes(spec.learned)} | {yes(spec.point is not None)} | "
                    f"{', '.join(fams) or '-'} |")
    return "\n".join(rows)


def run(args) -> int:
    import vlprune
    from vlprune.config import to_dict

    if args.methods_table:
        print(methods_table())
        return 0

    print("presets:", ", ".join(vlprune.list_presets()))
    print("methods:", ", ".join(vlprune.list_methods()))
    for name in vlprune.list_methods():
        print("  " + describe_method(name))
    if args.model:
        cfg = vlprune.load_preset(args.model)
        model = vlprune.build_model(cfg)
        n = sum(p.numel() for p in model.parameters())
        print(f"model {args.model}: arch={cfg.arch}, {n / 1e6:.2f}M parameters")
        print(to_dict(cfg))
    return 0
