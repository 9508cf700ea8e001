"""On a CUDA host (pytest -m gpu): the default GPU path -- torch.compile, bf16 autocast,
channels_last -- trains, checkpoints and evaluates; bench train measures it."""
from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from hamengine.config import CompileMode, LoaderKind, TrainConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def pack(request):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return request.getfixturevalue("train_pack")


@pytest.mark.parametrize("loader", ["resident", "dali"])
def test_compiled_bf16_channels_last_training(pack, tmp_path, loader):
    from hamengine.engine.train.trainer import FitOptions, fit

    cfg = TrainConfig(pack=str(pack), model="resnet18", epochs=2, batch_size=32, size=64, device="cuda",
                      loader=LoaderKind(loader), compile=CompileMode.AUTO, max_steps_per_epoch=8, out=str(tmp_path / "run"))
    summary = fit(cfg, FitOptions(console=Console(file=io.StringIO())))
    assert summary["compile_failed"] is None and summary["epochs"] == 2
    assert summary["test"]["n"] > 0 and summary["test"]["balanced_accuracy"] is not None
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])  # unwrapped from torch.compile


def test_bench_train_on_gpu(pack):
    from hamengine.bench.train import run_bench_train

    cfg = TrainConfig(pack=str(pack), model="resnet18", size=64, batch_size=32, device="cuda",
                      loader=LoaderKind.RESIDENT, compile=CompileMode.OFF)
    res = run_bench_train(cfg, steps=5, warmup=2, log=lambda m: None)
    assert res["img_per_s"] > 0 and 0 < res["stall_ratio"] and res["channels_last"] is True


@pytest.mark.parametrize("loader", ["resident", "dali"])
def test_no_host_sync_inside_training_steps(pack, tmp_path, loader):
    """Between logging steps the loop makes no host sync: batches from the loader and the whole step
    (forward, backward, AdamW, scheduler, EMA) run under torch.cuda.set_sync_debug_mode("error")."""
    from hamengine.engine.train import trainer as T
    from hamengine.engine.train.data import PackSource
    from hamengine.engine.train.distributed import DistInfo

    cfg = TrainConfig(pack=str(pack), model="resnet18", epochs=1, batch_size=16, size=64, device="cuda",
                      loader=LoaderKind(loader), compile=CompileMode.OFF, ema=0.999, out=str(tmp_path / "run"))
    from hamengine.engine.train.trainer import FitOptions

    loaders: list = []
    t = T.setup(cfg, FitOptions(console=Console(file=io.StringIO()), source=PackSource(cfg.pack)),
                DistInfo(), torch.device("cuda"), loaders)
    it = iter(t.train_loader)
    for _ in range(3):  # warm-up: allocator, cuDNN autotuning, lazy optimizer state
        t.step(*next(it))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [t.step(*next(it)) for _ in range(4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(x).item() for x in losses)
    for ld in loaders:
        ld.close()
