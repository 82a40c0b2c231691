"""Exceptions shared by the command line and the commands (kept low in the import order so that commands need
not import ``vlprune.cli``)."""


class CLIError(Exception):
    """An error meant for the user: printed as one line, exit code 2."""
