"""hamengine.hooks: the HAMENGINE_HOOKS syntax, conditions, actions, and that it costs nothing unset."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import timeit
from pathlib import Path

import pytest

from hamengine import hooks


@pytest.fixture()
def configure():
    """hooks.configure for one test; the rules are cleared afterwards."""
    yield hooks.configure
    hooks.configure(None)


def test_nothing_happens_without_a_spec(configure, tmp_path):
    configure(None)
    hooks.fire("pack.shard_done", split="train")  # no rules: returns
    # The unset path is one global lookup: far under a microsecond per call even on a loaded core.
    per_call = min(timeit.repeat(lambda: hooks.fire("train.step", epoch=1, step=1), number=20_000, repeat=3))
    assert per_call / 20_000 < 5e-6


def test_parse_rules_and_conditions():
    rules = hooks.parse("train.step@epoch=2,step=3:kill; pack.shard_done@3:sigint-group;"
                        "ffcv.export_locked:wait:/x/y:z")
    assert [(r.point, r.action, r.argument, r.match, r.nth) for r in rules] == [
        ("train.step", "kill", None, {"epoch": "2", "step": "3"}, None),
        ("pack.shard_done", "sigint-group", None, {}, 3),
        ("ffcv.export_locked", "wait", "/x/y:z", {}, None),  # paths may hold ':'
    ]


@pytest.mark.parametrize("spec, message", [
    ("train.step", "has no action"),
    ("train.stpe:kill", "unknown point 'train.stpe'"),
    ("train.step:explode", "unknown action 'explode'"),
    ("train.step:kill:now", "unknown action"),
    ("train.step:wait", "wait needs a path"),
    ("train.step@0:kill", "neither key=value nor one positive count"),
    ("train.step@2,3:kill", "neither key=value nor one positive count"),
    ("train.step@epoch:kill", "neither key=value nor one positive count"),
])
def test_bad_specs_name_the_rule(spec, message):
    with pytest.raises(hooks.HookSpecError, match=message):
        hooks.parse(spec)


def test_nth_firing_and_key_matches(configure, tmp_path):
    mark = tmp_path / "mark"
    configure(f"train.step@epoch=2,2:touch:{mark}")
    for epoch, step in [(1, 1), (1, 2), (2, 1)]:
        hooks.fire("train.step", epoch=epoch, step=step)
        assert not mark.exists(), (epoch, step)
    hooks.fire("pack.shard_done", epoch=2)  # another point: not counted
    assert not mark.exists()
    hooks.fire("train.step", epoch=2, step=2)  # the second firing with epoch=2
    assert mark.exists()
    mark.unlink()
    hooks.fire("train.step", epoch=2, step=3)  # acts once: the count has passed
    assert not mark.exists()


def test_without_a_count_every_match_acts(configure, tmp_path):
    marks = [tmp_path / "a", tmp_path / "b"]
    configure(f"pack.shard_done@split=val:touch:{marks[0]};pack.shard_done:touch:{marks[1]}")
    hooks.fire("pack.shard_done", split="train")
    assert not marks[0].exists() and marks[1].exists()
    hooks.fire("pack.shard_done", split="val")
    assert marks[0].exists()


def test_wait_blocks_until_the_gate_exists(configure, tmp_path):
    gate = tmp_path / "gate"
    configure(f"ffcv.export_locked:wait:{gate}")
    passed = threading.Event()
    waiter = threading.Thread(target=lambda: (hooks.fire("ffcv.export_locked"), passed.set()))
    waiter.start()
    reached = Path(f"{gate}.reached")
    for _ in range(2000):  # the waiter announces itself, then holds until the gate opens
        if reached.exists():
            break
        threading.Event().wait(0.005)
    assert reached.exists() and not passed.is_set()
    gate.touch()
    waiter.join(10)
    assert passed.is_set()


def test_wait_times_out_with_a_clear_error(configure, tmp_path, monkeypatch):
    monkeypatch.setenv(hooks.TIMEOUT_ENV, "0.05")
    configure(f"ffcv.export_locked:wait:{tmp_path / 'never'}")
    with pytest.raises(hooks.HookTimeout, match="never.*HAMENGINE_HOOKS_TIMEOUT"):
        hooks.fire("ffcv.export_locked")


def _child(spec: str, body: str, **popen) -> subprocess.CompletedProcess:
    """A Python child with HAMENGINE_HOOKS=spec in its environment (read at import, as in real runs)."""
    code = "from hamengine.hooks import fire\n" + textwrap.dedent(body)
    # A shell's background job starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition a terminal's job has.
    popen.setdefault("preexec_fn", lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, hooks.ENV: spec},
                          capture_output=True, text=True, timeout=60, **popen)


def test_kill_and_signals_from_the_environment():
    body = """
        for step in range(1, 6):
            print(step, flush=True)
            fire("train.step", epoch=1, step=step)
        """
    killed = _child("train.step@step=3:kill", body)
    assert killed.returncode == -signal.SIGKILL and killed.stdout.split() == ["1", "2", "3"]
    interrupted = _child("train.step@step=2:sigint", body)
    # KeyboardInterrupt raised at the hook, as Ctrl-C would; uncaught, Python exits by SIGINT
    assert interrupted.returncode == -signal.SIGINT and "KeyboardInterrupt" in interrupted.stderr
    assert interrupted.stdout.split() == ["1", "2"]
    terminated = _child("train.step@4:sigterm", body)
    assert terminated.returncode == -signal.SIGTERM and terminated.stdout.split() == ["1", "2", "3", "4"]


def test_group_signals_need_a_group_leader():
    body = 'fire("pack.shard_done", done=1)\nprint("survived")'
    led = _child("pack.shard_done:kill-group", body, start_new_session=True)
    assert led.returncode == -signal.SIGKILL and "survived" not in led.stdout
    # Not a group leader: signalling the group would hit the caller (here: pytest) too.
    refused = _child("pack.shard_done:kill-group", body)
    assert refused.returncode == 1 and "does not lead its process group" in refused.stderr


def test_a_bad_environment_spec_fails_where_it_is_used():
    out = _child("train.step:launch", 'print("imported")\nfire("train.step")')
    assert out.stdout.strip() == "imported" and "unknown action 'launch'" in out.stderr
