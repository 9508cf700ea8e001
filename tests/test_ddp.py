"""DDP with 2 CPU processes (torchrun, gloo): one run directory written by rank 0 alone, validation
gathered over both ranks (every val sample scored once), results close to one process with the
same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def pack(train_pack):
    return train_pack


def _common(pack, out):
    # aug none: both runs then see the same images in the same global batches (the loaders' DDP plan
    # splits each global batch between the ranks); what differs is BN statistics per rank and dropout.
    return ["train", "--pack", str(pack), "--model", "hamnet", "--epochs", "2", "--size", "32", "--no-amp",
            "--aug", "none", "--device", "cpu", "--loader", "resident", "--workers", "1",
            "--max-steps-per-epoch", "12", "--out", str(out)]


@pytest.mark.slow
def test_ddp_two_processes_one_run_dir(pack, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "hamengine", *_common(pack, ddp), "--batch-size", "16"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    res1 = subprocess.run([sys.executable, "-m", "hamengine", *_common(pack, single), "--batch-size", "32"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert res1.returncode == 0, res1.stderr[-3000:]

    manifest = json.loads((pack / "manifest.json").read_text())["splits"]
    rows = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 alone writes: no duplicated lines
    assert all(r["val_n"] == manifest["val"]["samples"] for r in rows)  # gathered over both ranks
    assert json.loads((ddp / "env.json").read_text())["world_size"] == 2
    assert json.loads((ddp / "config.json").read_text())["batch_size"] == 16
    last = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["rng"]) == 2  # every rank's RNG for an exact resume
    assert not any(k.startswith("module.") for k in last["model"])  # unwrapped from DDP
    test = json.loads((ddp / "eval-test" / "metrics.json").read_text())
    assert test["n"] == manifest["test"]["samples"]

    rows1 = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, rows1, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.1, (a, b)
        assert abs(a["val_loss"] - b["val_loss"]) < 0.2, (a, b)
