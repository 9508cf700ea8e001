"""Checkpoints: plain data readable with weights_only=True, atomic, clear errors when damaged;
RNG states round-trip so a resumed run draws the same numbers."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from hamengine.config import TrainConfig, from_dict, to_dict
from hamengine.engine.runtime.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hamengine.models import create_model


def _state():
    torch.manual_seed(0)
    model = create_model("hamnet")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    scaler = torch.amp.GradScaler("cpu")
    return model, opt, {"epoch": 3, "config": to_dict(TrainConfig(model="hamnet")), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict(), "rng": [rng_state()]}


def test_round_trip_weights_only(tmp_path):
    model, opt, state = _state()
    path = save_checkpoint(state, tmp_path / "ck" / "last.pt")
    raw = torch.load(path, weights_only=True)  # plain torch, no allow-listed classes
    assert raw["format"] == "hamengine-checkpoint" and raw["epoch"] == 3
    loaded = load_checkpoint(path)
    fresh = create_model("hamnet")
    fresh.load_state_dict(loaded["model"])
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    cfg = from_dict(TrainConfig, loaded["config"])
    assert cfg.model == "hamnet"
    assert not list(tmp_path.joinpath("ck").glob(".*tmp*"))  # no temp file left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    _, _, state = _state()
    path = save_checkpoint(state, tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a hamengine checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_failed_save_keeps_the_previous_file(tmp_path):
    _, _, state = _state()
    path = save_checkpoint(state, tmp_path / "last.pt")
    before = path.read_bytes()
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint({"bad": lambda: None}, path)  # not picklable: fails mid-write
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    path = save_checkpoint({"rng": [rng_state()]}, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(path)["rng"][0])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
