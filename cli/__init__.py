"""The ``zeropass`` command line, above both halves: it drives ``query`` (read) and ``indexer`` (write).

Each command parses options, calls the library, prints (docs/DESIGN.md §1); nothing imports this package.
``cli.base`` holds the group and the shared options, ``cli.read`` the commands that read a
dataset (SQL, the helpers, serve), ``cli.write`` those that build or change one. Data goes to
stdout, progress and notices to stderr; typed errors become one ``Error:`` line and exit code 1.
The indexer (torch, transformers) is imported only inside the commands that need it.
"""
from __future__ import annotations

from . import read, write  # noqa: F401  (they add their commands to the group)
from .base import cli

__all__ = ["cli", "main"]


def main(argv=None):
    """Console script entry point."""
    return cli.main(args=argv, prog_name="zeropass")
