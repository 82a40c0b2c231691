"""Exceptions shared by the command line and the commands (kept low in the import order so that commands need
not import ``vlprune.cli``), and the exit code of each kind of error.

Exit codes of ``vlprune``: 0 success; 1 a failure that is not the input's fault (an I/O error such as a full disk,
an error inside torch, a bug); 2 bad usage or input (argparse errors, bad values, missing or malformed files, bad
images, a run directory that exists or is in use); 130 after SIGINT (Ctrl-C); 143 after SIGTERM.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class CLIError(Exception):
    """An error meant for the user: printed as one line, exit code 2."""


class Terminated(BaseException):
    """Raised by the command line's SIGTERM handler (like KeyboardInterrupt for SIGINT): exit code 143."""


# input errors: the user can fix them by changing the command or the files it names
USAGE_ERRORS = (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError)


def exit_code(error: BaseException) -> int:
    """The exit code of the command line for ``error`` (see the module docstring)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(error, Terminated):
        return EXIT_SIGTERM
    return EXIT_USAGE if isinstance(error, USAGE_ERRORS) else EXIT_FAILURE
