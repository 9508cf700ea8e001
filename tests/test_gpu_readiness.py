"""GPU code paths proven on the CPU: DALI's availability probe, bench failure isolation,
device-independent augmentation parameters, the DDP wrapper."""
from __future__ import annotations

import pytest
import torch

from hamengine.config import ConfigError, LoaderConfig
from hamengine.loaders import build as build_mod
from hamengine.loaders.records import Pack


@pytest.fixture
def fresh_probe():
    build_mod.dali_status.cache_clear()
    yield
    build_mod.dali_status.cache_clear()


def test_dali_probe_runs_a_pipeline(fresh_probe):
    pytest.importorskip("nvidia.dali")
    assert build_mod.dali_status() == ""
    assert build_mod.dali_available()


def test_dali_unusable_falls_back(fresh_probe, monkeypatch, loader_pack):
    def broken():
        raise RuntimeError("libdali.so: cannot open shared object file\nmore detail")

    monkeypatch.setattr(build_mod, "_probe_dali", broken)
    assert not build_mod.dali_available()
    assert build_mod.dali_status() == "RuntimeError: libdali.so: cannot open shared object file"
    cfg = LoaderConfig(kind="auto", size=64, batch_size=16, memory_budget_gb=1e-9)  # nothing fits resident
    assert build_mod.choose_kind(Pack(loader_pack), "train", cfg, torch.device("cpu")).value == "torch"
    with pytest.raises(ConfigError, match="libdali.so"):
        build_mod.build_loader(loader_pack, "train", LoaderConfig(kind="dali", size=64, batch_size=16), "cpu")


def test_dali_import_error_is_reported(fresh_probe, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dali(name, *a, **kw):
        if name.startswith("nvidia.dali"):
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    assert not build_mod.dali_available()
    assert build_mod.dali_status().startswith("ImportError")


def test_bench_loader_isolates_a_failing_kind(monkeypatch, loader_pack):
    from hamengine.bench.loader import LoaderBench, run_bench_loader
    from hamengine.loaders.torch_loader import TorchLoader

    def boom(self):
        raise RuntimeError("simulated decode failure")
        yield  # pragma: no cover

    monkeypatch.setattr(TorchLoader, "__iter__", boom)
    out = run_bench_loader(LoaderBench(pack=str(loader_pack), kinds=["torch", "resident"], aug="none",
                                       batch_size=16, size=32, batches=2, warmup=1, workers=1, device="cpu",
                                       dtype="fp32"))
    by = {r["loader"]: r for r in out["results"]}
    assert by["torch"]["error"] == "RuntimeError: simulated decode failure"
    assert by["torch"]["img_per_s"] is None
    assert by["resident"].get("error") is None
    assert by["resident"]["img_per_s"] > 0 and by["resident"]["images"] == 32
    import json

    json.dumps(out["results"])  # the failure record is JSON (no exception object left in it)
