"""The one method-flag syntax of every sub-command: ``--method NAME --layers L,L --keep R[,R] --option NAME=VALUE``.

``--layers``, ``--keep`` and ``--option`` (repeatable) configure the ``--method`` they follow; given before any
``--method`` they configure the first one. Sub-commands that compare methods (``bench``) take ``--method`` several
times, each followed by its own settings:

    vlprune bench --method none --method trips --layers 5,10 --keep 0.7 --method tome --option r=8

An option's VALUE is read as JSON when it parses (``8``, ``0.5``, ``false``, ``[18,12]``) and as a string
otherwise (``like=evit``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Tuple, Union

DEST = "method_specs"


def parse_ints(text: str) -> Tuple[int, ...]:
    """``5,10`` -> (5, 10); anything else raises naming the text."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 5,10), got {text!r}") from None


def parse_floats(text: str) -> Union[float, Tuple[float, ...]]:
    """``0.7`` -> 0.7; ``0.9,0.7`` -> (0.9, 0.7)."""
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def parse_option(text: str) -> Tuple[str, Any]:
    """``NAME=VALUE`` -> (name, value); VALUE is JSON when it parses, else the string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. r=8), got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def _specs(namespace: argparse.Namespace) -> List[Dict[str, Any]]:
    specs = getattr(namespace, DEST, None)
    if specs is None:
        specs = []
        setattr(namespace, DEST, specs)
    return specs


def _current(namespace: argparse.Namespace) -> Dict[str, Any]:
    """The method the next setting configures: the last --method, or a placeholder before any."""
    specs = _specs(namespace)
    if not specs:
        specs.append({"name": None, "layers": None, "keep": None, "options": {}})
    return specs[-1]


class _Method(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        specs = _specs(namespace)
        if len(specs) == 1 and specs[0]["name"] is None:  # settings given before the first --method
            specs[0]["name"] = value
        else:
            specs.append({"name": value, "layers": None, "keep": None, "options": {}})


class _Setting(argparse.Action):
    """Sets ``const`` ("layers", "keep" or "options") of the current method."""

    def __call__(self, parser, namespace, value, option_string=None):
        spec = _current(namespace)
        if self.const == "options":
            spec["options"][value[0]] = value[1]
        else:
            spec[self.const] = value


def add_method_flags(p: argparse.ArgumentParser, several: bool = False, method_help: Optional[str] = None) -> None:
    """Add --method/--layers/--keep/--option to a sub-command's parser (``several``: --method may repeat)."""
    g = p.add_argument_group("reduction method")
    more = " (repeat to compare several, each followed by its own settings)" if several else ""
    g.add_argument("--method", action=_Method, dest=DEST, metavar="NAME",
                   help=(method_help or "reduction method (vlprune info lists them)") + more)
    g.add_argument("--layers", action=_Setting, dest=DEST, const="layers", type=parse_ints, metavar="L,L",
                   help="1-based layers of the method, e.g. 5,10 (default: the method's own)")
    g.add_argument("--keep", action=_Setting, dest=DEST, const="keep", type=parse_floats, metavar="R[,R]",
                   help="keep rate, or one per layer, e.g. 0.7 or 0.9,0.65,0.4 (default: the method's own)")
    g.add_argument("--option", action=_Setting, dest=DEST, const="options", type=parse_option, metavar="NAME=VALUE",
                   help="a method option, e.g. r=8 or lookahead=false (repeatable)")


def method_configs(args: argparse.Namespace, several: bool = False) -> List:
    """The ReduceConfigs the flags give, in order ([] without --method). Settings without a --method, or several
    methods where one is expected, raise ValueError."""
    from vlprune.reduce.registry import ReduceConfig

    specs = getattr(args, DEST, None) or []
    if specs and specs[0]["name"] is None:
        raise ValueError("--layers, --keep and --option need --method NAME (they configure the --method they follow)")
    if len(specs) > 1 and not several:
        raise ValueError(f"give one --method, got {len(specs)}: {[s['name'] for s in specs]}")
    return [ReduceConfig(s["name"], layers=s["layers"], keep=s["keep"], options=s["options"]) for s in specs]


def method_config(args: argparse.Namespace):
    """The one ReduceConfig of a single-method sub-command, or None without --method."""
    rcs = method_configs(args)
    return rcs[0] if rcs else None


def add_image_flags(p: argparse.ArgumentParser, skip: bool = True) -> None:
    """--skip-bad-images, --max-image-pixels and --allow-outside-root (train, eval; visualize: the pixel limit)."""
    g = p.add_argument_group("images")
    if skip:
        g.add_argument("--skip-bad-images", action="store_true",
                       help="skip (and count) samples whose image is missing or cannot be read, instead of stopping")
    g.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="an image with more pixels is refused as a bad image (a decompression bomb), from its header "
                   "(default: 100000000)")
    if skip:
        g.add_argument("--allow-outside-root", action="store_true", default=None,
                       help="let image paths of the annotation file leave the image root (../, absolute paths)")


def image_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The TrainConfig / ImageLoader settings of the image flags that were given."""
    out: Dict[str, Any] = {}
    if getattr(args, "max_image_pixels", None) is not None:
        if args.max_image_pixels < 1:
            raise ValueError(f"--max-image-pixels must be an integer >= 1, got {args.max_image_pixels}")
        out["max_image_pixels"] = args.max_image_pixels
    if getattr(args, "allow_outside_root", None):
        out["allow_outside_root"] = True
    return out
