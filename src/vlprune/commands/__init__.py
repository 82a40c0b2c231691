"""CLI sub-commands: one module each, with ``add_parser(subparsers)`` and ``run(args) -> int``.

``COMMANDS`` maps each sub-command to its module, in ``vlprune --help`` order; ``vlprune.cli`` imports the modules
when it builds the parser. A new sub-command is its module plus one name in the tuple below.
"""

from ..registry import Registry

COMMANDS: Registry[str] = Registry("command")
for _name in ("info", "data", "train", "eval", "bench", "visualize", "demo", "reproduce", "protocols"):
    COMMANDS.register(_name, f"{__name__}.{_name}")
del _name

__all__ = ["COMMANDS"]
