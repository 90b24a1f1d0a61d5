"""The stderr console the recipes print progress and notes on (stdout is left for results)."""

from __future__ import annotations

import sys


def console():
    """A rich console on the current sys.stderr (made per use: a test harness may swap the stream)."""
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False)
