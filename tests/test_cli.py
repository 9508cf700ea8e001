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


def test_every_registered_command_loads():
    """Each COMMANDS entry imports and names a click command (list_commands hides missing modules,
    so a typo in COMMANDS would otherwise vanish from --help silently)."""
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == list(COMMANDS)
    for name in COMMANDS:
        assert isinstance(cli.get_command(ctx, name), click.Command), name


def test_a_user_error_is_one_line_with_its_exit_code(tmp_path):
    """A UserError raised deep in the library (here: a pack path that is a file) is shown by the
    command group once, as `error: <message>`, with the error's exit status; no traceback."""
    afile = tmp_path / "manifest.json"
    afile.write_text("{}")
    for command in ("verify", "inspect"):
        r = CliRunner().invoke(cli, [command, str(afile)], catch_exceptions=False)
        assert r.exit_code == 1, r.output
        assert r.stderr.strip().startswith("error: ") and "is a file, not a pack folder" in r.stderr, r.stderr
        assert "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["train", "--pack", str(tmp_path), "--epochs", "0"], catch_exceptions=False)
    assert r.exit_code == 2 and "--epochs 0 must be >= 1" in r.stderr  # ConfigError: exit 2


def test_bench_library_does_not_depend_on_the_command_line():
    """Layers point one way: bench/ returns results; hamengine/commands/bench.py parses and prints."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for path in [*sorted((repo / "bench").glob("*.py")), repo / "hamengine" / "commands" / "bench.py"]:
        tree = ast.parse(path.read_text(), str(path))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        forbidden = {"hamengine.cli"} | ({"click", "rich", "hamengine.commands"} if path.parent.name == "bench"
                                         else set())
        bad = {m for m in names if any(m == f or m.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{path.relative_to(repo)} imports {sorted(bad)}"


def test_doctor_json_keys():
    # a tiny plan shape: the probe itself is tested in test_hostplan.py
    out = subprocess.run([sys.executable, "-m", "hamengine", "doctor", "--json", "--size", "32", "--batch-size", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("python", "torch", "torchvision", "dali", "cuda", "gpu", "dali_cpu_pipeline",
                "dali_gpu_pipeline", "cpus"):
        assert key in report
    assert isinstance(report["cuda"], bool) and report["cpus"] >= 1
    assert report["plan"]["lines"] and report["plan"]["amp_dtype"] in ("bfloat16", "float16", "fp32")
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


def test_bench_train_options_are_trains_own():
    """`bench train` declares no training option by hand: the ones it times are train's, with
    train's names, defaults, choices and help (generated from TrainConfig)."""
    from hamengine.commands.bench import BENCH_TRAIN_FIELDS, bench
    from hamengine.commands.train import train

    ours = {p.name: p for p in bench.commands["train"].params}
    theirs = {p.name: p for p in train.params}
    for name in BENCH_TRAIN_FIELDS:
        a, b = ours[name], theirs[name]
        assert (a.opts, a.secondary_opts, a.default, a.help) == (b.opts, b.secondary_opts, b.default, b.help), name
        assert getattr(a.type, "choices", None) == getattr(b.type, "choices", None), name
    assert ours["batch_size"].default == 32  # train's, no longer a bench-only 128
