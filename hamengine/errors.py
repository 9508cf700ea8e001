"""The one error family for what a user can cause.

Every error a user can fix (a bad option, CSV, image, pack, run folder or checkpoint) derives from
`UserError` and carries the message to show: what is wrong, where (file, row, option), and what
to do. The command line catches `UserError` once (hamengine/cli.py) and prints that message;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; `str(e)` is the whole message to show. `exit_code` is the
    process status the command line exits with (2: usage/config, 1: data or run problems)."""

    exit_code: int = 1


class ConfigError(UserError, ValueError):
    """A configuration the user gave cannot be used; the message says which key and why."""

    exit_code = 2
