"""The ``vlprune`` command line. Thin: each sub-command lives in ``vlprune/commands/<name>.py`` with
``add_parser(subparsers)`` and ``run(args) -> int``; they build the same config objects and call the Python API.

Errors print one line to stderr and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .version import __version__
from .errors import CLIError  # noqa: F401  (re-exported: ``from vlprune.cli import CLIError`` keeps working)

# sub-command modules under vlprune.commands, in help order
COMMANDS = ["info", "data", "train", "eval", "bench", "visualize", "demo"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlprune",
        description="Text-guided image-token reduction for vision-language transformers.",
    )
    p.add_argument("--version", action="version", version=f"vlprune {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"vlprune.commands.{name}").add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("vlprune: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"vlprune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
