"""Helpers shared by the commands: error reporting, JSON output, worker counts."""
from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
from rich.console import Console

from hamengine.runtime import cpu_count

console = Console(stderr=False)
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """`error: <message>` on stderr: the one way a command line error is shown."""
    # The message may quote user data ("[...]", "..") verbatim: print it without markup.
    err_console.print("error:", style="bold red", end=" ")
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """A check of the command itself failed: print the message (no traceback) and exit non-zero.
    Errors the library raises are UserErrors, shown by the command group (hamengine/cli.py)."""
    print_error(message)
    sys.exit(code)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def resolve_workers(n: int) -> int:
    return n if n and n > 0 else cpu_count()
