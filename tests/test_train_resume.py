"""kill -9 in the middle of an epoch, then --resume: the run completes and its final weights are
bit-identical to an uninterrupted run's (CPU, fp32, --deterministic).

The guarantee is at epoch boundaries: last.pt is written after each completed epoch with model,
optimizer, scheduler, EMA, every RNG state and the epoch; the resumed run redoes the killed epoch
from there. Loaders reshuffle and augment from (seed, epoch), so the redone epoch sees the same
batches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_data import small_pack


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return small_pack(tmp_path_factory.getbasetemp() / "train-data")


def _cmd(pack, out, *extra):
    return [sys.executable, "-m", "hamengine", "train", "--pack", str(pack), "--model", "hamnet",
            "--epochs", "3", "--batch-size", "16", "--size", "32", "--no-amp", "--deterministic",
            "--device", "cpu", "--loader", "resident", "--ema", "0.9", "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # fixed thread count: same reduction order


def test_kill9_mid_epoch_then_resume_matches_uninterrupted(pack, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(pack, full), check=True, env=_env(), capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(pack, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.5)  # well into epoch 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(last, weights_only=True)["epoch"] in (1, 2)

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
    """SIGINT to the whole process group (what Ctrl-C does; loader workers get it too): exit 130,
    last.pt intact at the last completed epoch, and --resume finishes the run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hamengine", "train", "--pack", str(pack), "--model", "hamnet", "--epochs", "4",
           "--batch-size", "16", "--size", "32", "--device", "cpu", "--loader", "resident", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    assert "interrupted" in output and "--resume" in output
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert epoch in (1, 2, 3)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == epoch
    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(last, weights_only=True)["epoch"] == 4
