"""The `hamengine` command line: one click group whose commands load lazily.

Each command lives in hamengine/commands/<area>.py, only parses its options and delegates to the
library; loading lazily keeps `hamengine --help` fast (no torch / DALI import). Errors a user can
cause are `hamengine.errors.UserError`s: the group shows them once (LazyGroup.invoke).
"""
from __future__ import annotations

import errno
import importlib
import importlib.util
import sys

import click

from hamengine.commands.common import print_error
from hamengine.errors import UserError

# name -> "module:attribute". Order here is the order in --help.
COMMANDS: dict[str, str] = {
    "doctor": "hamengine.commands.doctor:doctor",
    "synth": "hamengine.commands.synth:synth",
    "pack": "hamengine.commands.pack:pack",
    "verify": "hamengine.commands.pack:verify",
    "inspect": "hamengine.commands.pack:inspect_pack",
    "export-ffcv": "hamengine.commands.ffcv:export_ffcv",
    "models": "hamengine.commands.train:models",
    "train": "hamengine.commands.train:train",
    "demo": "hamengine.commands.train:demo",
    "eval": "hamengine.commands.evaluate:eval_run",
    "predict": "hamengine.commands.evaluate:predict",
    "explain": "hamengine.commands.evaluate:explain",
    "compare": "hamengine.commands.evaluate:compare",
    "report": "hamengine.commands.evaluate:report",
    "serve": "hamengine.commands.serve:serve",
    "bench": "hamengine.commands.bench:bench",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used (or listed in --help)."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def _available(self, name: str) -> bool:
        module = self.lazy[name].split(":")[0]
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in self.lazy if self._available(n)] + sorted(super().list_commands(ctx))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and self._available(name):
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        """The one place a user's mistake becomes a message: a UserError raised by any command (or
        the library under it) is printed as `error: <message>` and exits with its exit_code. An
        OSError (an output folder that cannot be written) is shown the same way. Anything else is a
        bug and keeps its traceback."""

        try:
            return super().invoke(ctx)
        except UserError as e:
            print_error(str(e))
            ctx.exit(e.exit_code)
        except OSError as e:
            if e.errno == errno.EPIPE:  # `hamengine ... | head`: click handles a closed pipe
                raise
            where = f"{e.filename}: " if e.filename else ""
            print_error(f"{where}{e.strerror or e} (check that the path exists, is a folder where one is "
                        f"expected, and is writable)")
            ctx.exit(1)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"],
                                                            "max_content_width": 100})
@click.version_option(package_name="hamengine")
def cli() -> None:
    """hamengine: pack HAM10000 into sharded records, load it with DALI or a resident cache,
    train CNNs with AMP + torch.compile, evaluate, explain and serve them.

    \b
    Typical flow:
      hamengine synth --out data/synth --n 2000        # or use a real HAM10000 download
      hamengine pack --source data/synth --out packs/synth
      hamengine train --pack packs/synth --model hamnet --epochs 10 --out runs/hamnet
      hamengine eval runs/hamnet
    """


def main() -> None:
    """The installed entry point. Errors are turned into messages by the group (LazyGroup.invoke)."""
    cli(prog_name="hamengine", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
