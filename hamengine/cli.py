"""The `hamengine` command line: one click group whose commands load lazily.

Each command lives in hamengine/commands/<area>.py, only parses its options and delegates to the
library; loading lazily keeps `hamengine --help` fast (no torch / DALI import).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import click

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
    """Commands turn the errors they expect into messages; these two can come from anywhere (an
    output folder that cannot be written, a --device that is not here): one line, never a traceback."""
    from hamengine.config import ConfigError

    try:
        cli(prog_name="hamengine", standalone_mode=True)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e} (check that the path exists, is a folder where one "
                   f"is expected, and is writable)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
