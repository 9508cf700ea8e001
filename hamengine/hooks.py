"""Named test points: the code calls `fire(point, **ctx)` at moments a test needs to act on
(kill a pack after its third shard, interrupt training at a given step, hold an exporter while it
holds its lock), so the test does not guess with sleeps.

`fire` does nothing unless the environment variable HAMENGINE_HOOKS was set when this module was
first imported (one global lookup per call). Tests set it on a subprocess's environment, or call
`configure(spec)` in-process.

Syntax: rules separated by ";", each `POINT[@CONDITION]:ACTION[:ARGUMENT]`

    HAMENGINE_HOOKS="train.step@epoch=2,step=3:kill"
    HAMENGINE_HOOKS="pack.shard_done@3:sigint-group;ffcv.export_locked:wait:/tmp/gate"

- POINT is one of `POINTS` below (an unknown name is an error, so a typo cannot silently never fire).
- CONDITION is a comma-separated list of `key=value` (the firing's context value, compared as
  text) and at most one integer N: the rule acts on the Nth firing whose keys match (counted per
  process, from 1). Without N it acts on every matching firing; without a condition, on every firing.
- ACTION:
  - `kill`, `sigint`, `sigterm`: send SIGKILL / SIGINT / SIGTERM to this process. SIGINT arrives as
    KeyboardInterrupt at this point in the main thread, as Ctrl-C would.
  - `kill-group`, `sigint-group`, `sigterm-group`: the same signal to this process's whole group
    (what Ctrl-C does: pool workers get it too). Only for a process that leads its own group (start
    it with `start_new_session=True`); elsewhere it would signal the caller as well, so it raises.
  - `touch:PATH`: create the file PATH.
  - `wait:PATH`: create PATH + ".reached", then block until PATH exists (polling). After
    HAMENGINE_HOOKS_TIMEOUT seconds (default 300) it raises HookTimeout, so a test that never opens
    the gate fails instead of hanging.
Paths may contain ":" but not ";".
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "HAMENGINE_HOOKS"
TIMEOUT_ENV = "HAMENGINE_HOOKS_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
POLL_S = 0.005

POINTS = {
    "train.step": "after every optimizer step; epoch (1-based), step (1-based within the epoch)",
    "pack.shard_done": "a pack shard is complete under its final name; split, shard (file name), done "
                       "(shards completed so far)",
    "ffcv.export_locked": "an FFCV export holds the pack's export lock and is about to write; pack (path)",
}

_SIGNALS = {"kill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}
_ACTIONS_WITH_PATH = ("touch", "wait")


class HookSpecError(ValueError):
    """HAMENGINE_HOOKS (or a `configure` spec) cannot be parsed or cannot act here."""


class HookTimeout(RuntimeError):
    """A `wait:PATH` rule waited longer than HAMENGINE_HOOKS_TIMEOUT for PATH."""


@dataclass
class Rule:
    point: str
    action: str
    argument: str | None = None
    match: dict[str, str] = field(default_factory=dict)
    nth: int | None = None
    seen: int = 0  # matching firings so far, in this process

    def applies(self, point: str, ctx: dict[str, object]) -> bool:
        if point != self.point or any(str(ctx.get(k)) != v for k, v in self.match.items()):
            return False
        self.seen += 1
        return self.nth is None or self.seen == self.nth


def parse(spec: str) -> list[Rule]:
    """The rules of a HAMENGINE_HOOKS value; HookSpecError naming the bad rule."""
    rules = []
    for text in filter(None, (part.strip() for part in spec.split(";"))):
        head, sep, action = text.partition(":")
        if not sep or not action:
            raise HookSpecError(f"{ENV}: {text!r} has no action (POINT[@CONDITION]:ACTION)")
        point, _, condition = head.partition("@")
        if point not in POINTS:
            raise HookSpecError(f"{ENV}: {text!r}: unknown point {point!r} (known: {', '.join(POINTS)})")
        rule = Rule(point, *_parse_action(text, action))
        for item in filter(None, condition.split(",")):
            key, eq, value = item.partition("=")
            if eq and re.fullmatch(r"[A-Za-z_]\w*", key):
                rule.match[key] = value
            elif item.isdigit() and int(item) > 0 and rule.nth is None:
                rule.nth = int(item)
            else:
                raise HookSpecError(f"{ENV}: {text!r}: condition {item!r} is neither key=value nor one "
                                    f"positive count")
        rules.append(rule)
    return rules


def _parse_action(text: str, action: str) -> tuple[str, str | None]:
    name, _, argument = action.partition(":")
    if name in _ACTIONS_WITH_PATH:
        if not argument:
            raise HookSpecError(f"{ENV}: {text!r}: {name} needs a path ({name}:PATH)")
        return name, argument
    base = name.removesuffix("-group")
    if base in _SIGNALS and not argument:
        return name, None
    raise HookSpecError(f"{ENV}: {text!r}: unknown action {action!r} (kill, sigint, sigterm, their -group "
                        f"forms, touch:PATH, wait:PATH)")


_spec: str | None = os.environ.get(ENV) or None
_rules: list[Rule] | None = None  # parsed on the first firing: a bad spec fails where it is used
_lock = threading.Lock()


def configure(spec: str | None) -> None:
    """Replace the active rules (None: none), resetting their counts; for in-process tests."""
    global _spec, _rules
    with _lock:
        _rules = parse(spec) if spec else None
        _spec = spec or None


def fire(point: str, **ctx: object) -> None:
    """Act on every rule for `point` whose condition this firing meets; nothing when no spec is set."""
    if _spec is None:
        return
    _fire(point, ctx)


def _fire(point: str, ctx: dict[str, object]) -> None:
    global _rules
    with _lock:
        if _rules is None:
            _rules = parse(_spec or "")
        due = [r for r in _rules if r.applies(point, ctx)]
    for rule in due:
        _act(rule)


def _act(rule: Rule) -> None:
    if rule.action == "touch":
        Path(rule.argument or "").touch()
    elif rule.action == "wait":
        _wait(Path(rule.argument or ""))
    elif rule.action.endswith("-group"):
        if os.getpgrp() != os.getpid():
            raise HookSpecError(f"{ENV}: {rule.action} at {rule.point}: this process does not lead its "
                                f"process group (start it with start_new_session=True)")
        os.killpg(os.getpgrp(), _SIGNALS[rule.action.removesuffix("-group")])
    else:
        os.kill(os.getpid(), _SIGNALS[rule.action])


def _wait(gate: Path) -> None:
    timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    Path(f"{gate}.reached").touch()
    deadline = time.monotonic() + timeout
    while not gate.exists():
        if time.monotonic() > deadline:
            raise HookTimeout(f"{ENV}: waited {timeout:g} s for {gate} ({TIMEOUT_ENV} sets the limit)")
        time.sleep(POLL_S)
