"""hamengine.bench: the benchmarks as functions that take typed options and return result dicts.
The command line (`hamengine bench ...`, hamengine/commands/bench.py) parses and prints them."""
from __future__ import annotations

from hamengine.errors import UserError


class BenchError(UserError):
    """A benchmark could not run (a failed child pack, a server that did not start, a loader that
    cannot read the pack); the message says which and why."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
