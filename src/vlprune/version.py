"""The package version (kept in a module of its own so that the CLI need not import the package facade)."""

__version__ = "0.1.0"
