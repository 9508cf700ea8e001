"""kill -9 in the middle of an epoch, then --resume: the run completes and its final weights are
bit-identical to an uninterrupted run's (CPU, fp32, --deterministic). The interruptions happen at a
named step (HAMENGINE_HOOKS, see hamengine/hooks.py), not after a guessed sleep.

The guarantee is at epoch boundaries: last.pt is written after each completed epoch with model,
optimizer, EMA, every RNG state and the epoch; the resumed run redoes the killed epoch
from there. Loaders reshuffle and augment from (seed, epoch), so the redone epoch sees the same
batches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from hamengine.hooks import ENV as HOOKS

pytestmark = pytest.mark.slow  # three-plus CPU trainings per test


@pytest.fixture(scope="module")
def pack(train_pack):
    return train_pack


def _cmd(pack, out, *extra):
    return [sys.executable, "-m", "hamengine", "train", "--pack", str(pack), "--model", "hamnet",
            "--epochs", "3", "--batch-size", "16", "--size", "32", "--no-amp", "--deterministic",
            "--device", "cpu", "--loader", "resident", "--ema", "0.9", "--out", str(out), *extra]


def _env(hooks: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != HOOKS}
    env["OMP_NUM_THREADS"] = "1"  # fixed thread count: same reduction order
    if hooks:
        env[HOOKS] = hooks
    return env


def test_kill9_mid_epoch_then_resume_matches_uninterrupted(pack, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(pack, full), check=True, env=_env(), capture_output=True, timeout=600)

    # SIGKILL right after the 3rd optimizer step of epoch 2: last.pt holds epoch 1.
    proc = subprocess.run(_cmd(pack, killed), env=_env("train.step@epoch=2,step=3:kill"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = killed / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1

    resumed = subprocess.run(_cmd(pack, killed, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "ema"):
        sa = a[key]["model"] if key == "ema" else a[key]
        sb = b[key]["model"] if key == "ema" else b[key]
        for name, tensor in sa.items():
            assert torch.equal(tensor, sb[name]), f"{key}.{name} differs after resume"
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])
    rows_a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2, 3]
    assert [r["val_loss"] for r in rows_a] == [r["val_loss"] for r in rows_b]


def test_ctrl_c_stops_cleanly_at_a_step_boundary(pack, tmp_path):
    """SIGINT to the whole process group (what Ctrl-C does; loader workers get it too) during epoch 2:
    exit 130, last.pt intact at epoch 1, and --resume finishes the run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hamengine", "train", "--pack", str(pack), "--model", "hamnet", "--epochs", "4",
           "--batch-size", "16", "--size", "32", "--device", "cpu", "--loader", "resident", "--out", str(out)]
    proc = subprocess.run(cmd, env=_env("train.step@epoch=2,step=2:sigint-group"), capture_output=True,
                          text=True, timeout=600, start_new_session=True,  # its own group, as a terminal's job
                          # a shell's background job starts with SIGINT ignored: give the child the
                          # default disposition a terminal's job has, or Ctrl-C is never delivered
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 130, output[-2000:]
    assert "interrupted" in output and "--resume" in output
    last = out / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(last, weights_only=True)["epoch"] == 4
