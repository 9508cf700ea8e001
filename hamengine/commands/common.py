"""Helpers shared by the commands: error reporting, JSON output, worker counts."""
from __future__ import annotations

import dataclasses
import enum
import json
import shlex
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn

import click
from rich.console import Console

from hamengine.config import TTA, CheckpointName
from hamengine.runtime import cpu_count

# --checkpoint / --tta of eval, predict, explain and serve: None = the run's own (config.json).
CKPT_CHOICES = [k.value for k in CheckpointName]
TTA_CHOICES = [k.value for k in TTA]
CKPT_HELP = ("Which weights of the run: best (highest val balanced accuracy) or last (the final weights). "
             "[default: the run's own, config.json checkpoint (train --checkpoint; best for older runs)]")
TTA_HELP = ("Test-time augmentation: average probabilities over flips (4 views), or flips and 90-degree "
            "rotations (8). [default: the run's own, config.json test_tta (train --test-tta; none for older runs)]")

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


def int_list(option: str, text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers such as 1,2",
                                 param_hint=option) from None


def command_line() -> str:
    """How this benchmark was started, for its result file."""
    return "hamengine " + shlex.join(sys.argv[1:])


def say(as_json: bool):
    return (lambda _m: None) if as_json else (lambda m: console.print(m, highlight=False))


def _optional_inner(tp: Any) -> Any:
    """`float | None` -> float."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def config_options(cls: type, only: tuple[str, ...] | None = None) -> Callable[[Callable], Callable]:
    """One click option per field of `cls` declared with hamengine.config.option: help, default,
    choices (from the enum type) and flag names come from the field, so options are defined once
    (`train` takes them all; `bench train` the ones it times, `only`)."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    decorators = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or (only is not None and f.name not in only):
            continue
        tp, default = _optional_inner(hints[f.name]), getattr(defaults, f.name)
        if meta["sub"]:  # the option sets one key of a nested config
            tp, default = typing.get_type_hints(tp)[meta["sub"]], getattr(default, meta["sub"])
        decl = meta["flag"] or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"default": default, "help": meta["help"], "show_default": True}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            kw.update(type=click.Choice(list(meta["choices"] or [m.value for m in tp])), default=default.value)
        elif tp is bool and "/" not in decl:  # `--a/--no-a` is a boolean flag already
            kw["is_flag"] = True
        elif meta["path"]:
            kw["type"] = click.Path()
        else:
            kw["type"] = tp
        if meta["default_help"]:
            kw.update(help=f"{meta['help']}  [default: {meta['default_help']}]", show_default=False)
        decorators.append(click.option(decl, f.name, **kw))

    def apply(fn: Callable) -> Callable:
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn
    return apply
