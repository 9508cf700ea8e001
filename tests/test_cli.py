"""The command line: every command has a --help that documents every option; doctor works."""
from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from hamengine.cli import COMMANDS, cli


def _all_commands():
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            sub = click.Context(cmd)
            for subname in cmd.list_commands(sub):
                yield f"{name} {subname}", cmd.get_command(sub, subname)
        yield name, cmd


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in ("doctor", "synth"):
        assert name in result.output


@pytest.mark.parametrize("name,cmd", list(_all_commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_is_documented(name, cmd):
    result = CliRunner().invoke(cli, name.split() + ["--help"])
    assert result.exit_code == 0, result.output
    assert cmd.help, f"`hamengine {name}` has no help text"
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"`hamengine {name}` option {param.opts} has no help text"


def test_registered_commands_exist_or_are_planned():
    ctx = click.Context(cli)
    listed = cli.list_commands(ctx)
    assert set(listed) <= set(COMMANDS)
    assert "doctor" in listed


def test_doctor_json_keys():
    out = subprocess.run([sys.executable, "-m", "hamengine", "doctor", "--json"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("python", "torch", "torchvision", "dali", "cuda", "gpu", "dali_cpu_pipeline",
                "dali_gpu_pipeline", "cpus"):
        assert key in report
    assert isinstance(report["cuda"], bool) and report["cpus"] >= 1
    if report["dali"] is not None:
        # DALI is a hard dependency on Linux and its CPU pipeline must run without a GPU.
        assert report["dali_cpu_pipeline"] is True
    if not report["cuda"]:
        assert report["gpu"] is None and report["dali_gpu_pipeline"] is False


def test_no_top_level_packages_leak():
    """engine/loaders/models/bench are installed under hamengine only."""
    import importlib.util
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', %r)];"
            "print([n for n in ('engine','loaders','models','bench') if importlib.util.find_spec(n)])" % repo)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert importlib.util.find_spec("hamengine.engine") is not None
