"""The ``vlprune`` command line: the global flags, logging, signals and one-line errors. Each sub-command lives in
``vlprune/commands/<name>.py`` (registered in ``vlprune.commands.COMMANDS``) with ``add_parser(subparsers)`` and
``run(args) -> int``; a command checks its flags, builds the config objects and calls the Python API, with some
orchestration of its own (``eval`` with an official checkpoint, ``train --resume``, ``demo``).

Every parser refuses abbreviated flags (``--opt`` is not ``--option``) and shows defaults in ``--help``. The
global flags ``--debug``, ``-v/--verbose``, ``--quiet``, ``--threads``, ``--precision`` and ``--compile`` are
accepted before or after the sub-command. ``--threads`` defaults to the available cores divided by the processes
sharing them (``vlprune.runtime``); ``--precision`` and ``--compile`` are honoured by ``train``, ``eval`` and
``bench`` and refused elsewhere. Errors print one line to stderr and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
import sys
import threading
from typing import Iterator, List, Optional, Set

from .commands import COMMANDS
from .errors import CLIError, Terminated, exit_code  # noqa: F401  (CLIError re-exported for earlier imports)
from .version import __version__

GLOBAL_DEFAULTS = {"debug": False, "verbose": False, "quiet": False, "threads": None, "precision": None,
                   "compile": False}
# the sub-commands that run a model and honour --precision / --compile
RUNTIME_COMMANDS = ("train", "eval", "bench")
# settings that error messages name by their config field -> the flag the user typed, per sub-command (replaced
# where the message says "FIELD must ..." or "FIELD=VALUE")
FIELD_FLAGS = {
    "train": {"batch_size": "--batch-size", "accum": "--accum", "steps": "--steps", "epochs": "--epochs",
              "log_every": "--log-every", "ckpt_every": "--ckpt-every", "scenes_images": "--scenes-images",
              "num_workers": "--workers", "save_total_limit": "--save-total-limit", "threads": "--threads",
              "max_image_pixels": "--max-image-pixels", "lr": "--lr", "weight_decay": "--weight-decay",
              "grad_clip": "--grad-clip"},
    "bench": {"vision.image_size": "--image-size", "text_len": "--text-len", "batch_size": "--batch-size",
              "repeats": "--repeats", "warmup": "--warmup", "mem_budget": "--mem-budget"},
    "data": {"image_size": "--image-size", "images": "--images", "questions": "--questions",
             "min_objects": "--min-objects", "max_objects": "--max-objects", "test_fraction": "--test-fraction",
             "object_scale": "--object-scale"},
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends an option's default to its help (unless it says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "%(default)" in text or "(default" in text or not action.option_strings:
            return text
        if d is None or d is False or d == [] or d == "" or d is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def _add_global_flags(p: argparse.ArgumentParser, top: bool) -> None:
    """--debug, -v/--verbose, --quiet, --threads, --precision, --compile; on sub-commands they default to SUPPRESS so that a flag given
    before the sub-command is not reset by the sub-command's parser. A sub-command that defines one of them itself
    keeps its own."""
    own = set(p._option_string_actions)
    g = p.add_argument_group("global options")
    flags = [(("--debug",), dict(action="store_true", help="show full tracebacks on errors")),
             (("-v", "--verbose"), dict(action="store_true", help="log at INFO level")),
             (("--quiet",), dict(action="store_true", help="no progress bars; log errors only")),
             (("--threads",), dict(type=int, metavar="N", help="torch CPU threads (default: the available cores "
                                   "divided by the processes sharing them, or OMP_NUM_THREADS when set)")),
             (("--precision",), dict(choices=("fp32", "bf16", "fp16"),
                                     help="train/eval/bench: autocast precision (bf16 on CPU and CUDA; fp16 on CUDA, "
                                     "and on CPUs with native fp16) (default: fp32; train: autocast on CUDA only, "
                                     "as --no-amp says)")),
             (("--compile",), dict(action="store_true", help="train/eval/bench: torch.compile the model (eager "
                                   "fallback with a warning where it cannot compile)"))]
    for names, spec in flags:
        if not own.intersection(names):
            if not top:
                spec = {**spec, "default": argparse.SUPPRESS}
            g.add_argument(*names, **spec)


def _parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``p`` and every sub-command parser below it."""
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlprune",
        description="Text-guided image-token reduction for vision-language transformers.",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"vlprune {__version__}")
    _add_global_flags(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for _, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    for child in list(_parsers(p))[1:]:
        child.allow_abbrev = False
        child.formatter_class = HelpFormatter
        _add_global_flags(child, top=False)
    return p


def given_flags(argv: Optional[List[str]]) -> Set[str]:
    """The ``dest`` names of the options typed in ``argv`` (parsed again with every default suppressed), so that a
    command can tell ``--batch-size 32`` typed from the default 32 (``train --resume`` compares what was typed)."""
    p = build_parser()
    for q in _parsers(p):
        for action in q._actions:
            if action.option_strings:
                action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "resume", False):
        args.given = given_flags(argv)
    for k, v in GLOBAL_DEFAULTS.items():
        if not hasattr(args, k):
            setattr(args, k, v)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and --quiet exclude each other")
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    old = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        if args.command not in RUNTIME_COMMANDS:
            for flag, dest in (("--precision", "precision"), ("--compile", "compile")):
                if getattr(args, dest) != GLOBAL_DEFAULTS[dest]:
                    raise ValueError(f"{flag} is for {', '.join(RUNTIME_COMMANDS)}; 'vlprune {args.command}' does not use it")
        from .runtime import apply_threads, check_threads

        if args.threads is not None:
            check_threads(args.threads)
        if args.command != "demo":  # the demo sets its own threads (default: the available cores)
            apply_threads(args.threads)
        return int(args.run(args) or 0)
    except (KeyboardInterrupt, Terminated) as e:
        print(f"vlprune: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return exit_code(e)
    except Exception as e:
        if args.debug:
            raise
        code = exit_code(e)
        print(f"vlprune {args.command}: error: {error_message(args.command, e, code)}", file=sys.stderr)
        return code
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _terminate(signum, frame):
    raise Terminated()


def error_message(command: str, e: BaseException, code: int) -> str:
    """One line for ``e``: its message with config fields named by the flags typed (``FIELD_FLAGS``); an error
    that is not about the input also names its type and points at --debug."""
    text = str(e).strip() or type(e).__name__
    for field, flag in FIELD_FLAGS.get(command, {}).items():
        text = re.sub(rf"(?<![\w.-]){re.escape(field)}(?=\s+must\b|=)", flag, text)
    if code == 1:
        text = f"{type(e).__name__}: {text} (--debug shows the traceback)"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
