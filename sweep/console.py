"""Consoles for results: tables keep their columns when stdout is a file or a pipe."""

from __future__ import annotations

import sys

from rich.console import Console


def stdout_console() -> Console:
    """A console on stdout; 160 columns wide when stdout is not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=160)
