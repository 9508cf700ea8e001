"""GPU code paths proven on the CPU: DALI's availability probe, bench failure isolation,
device-independent augmentation parameters, the DDP wrapper."""
from __future__ import annotations

import pytest
import torch

from hamengine.config import LoaderConfig
from hamengine.errors import ConfigError
from hamengine.loaders import build as build_mod
from hamengine.loaders.kinds import dali as dali_mod
from hamengine.loaders.pack.records import Pack


@pytest.fixture
def fresh_probe():
    dali_mod.dali_status.cache_clear()
    yield
    dali_mod.dali_status.cache_clear()


def test_dali_probe_runs_a_pipeline(fresh_probe):
    pytest.importorskip("nvidia.dali")
    assert dali_mod.dali_status() == ""
    assert dali_mod.dali_available()


def test_dali_unusable_falls_back(fresh_probe, monkeypatch, loader_pack):
    def broken():
        raise RuntimeError("libdali.so: cannot open shared object file\nmore detail")

    monkeypatch.setattr(dali_mod, "_probe_dali", broken)
    assert not dali_mod.dali_available()
    assert dali_mod.dali_status() == "RuntimeError: libdali.so: cannot open shared object file"
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
    assert not dali_mod.dali_available()
    assert dali_mod.dali_status().startswith("ImportError")


def test_bench_loader_isolates_a_failing_kind(monkeypatch, loader_pack):
    from hamengine.bench.loader import LoaderBench, run_bench_loader
    from hamengine.loaders.kinds.torch_loader import TorchLoader

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


def _run_train_decode(pack_dir, whole_then_crop: bool, size: int = 48):
    """The train decode step of the DALI graph, on CPU threads; whole_then_crop=True is the GPU
    graph's operator sequence (whole decode + fn.random_resized_crop) with device='cpu'."""
    from nvidia.dali import fn, pipeline_def, types

    from hamengine.config import AugConfig
    from hamengine.loaders.kinds.dali import _decode_train

    shards = Pack(pack_dir).shards("train")

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=5)
    def pipe():
        jpg, _cls = fn.readers.webdataset(paths=[str(s.path) for s in shards],
                                          index_paths=[str(s.idx_path) for s in shards], ext=["jpg", "cls"],
                                          dtypes=[types.UINT8, types.UINT8])
        return _decode_train(jpg, AugConfig(preset="full"), size, {"device": "cpu", "output_type": types.RGB},
                             whole_then_crop=whole_then_crop)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [out.at(i).shape for i in range(len(out))]


def test_dali_gpu_decode_sequence_on_cpu(loader_pack):
    pytest.importorskip("nvidia.dali")
    assert all(shape == (48, 48, 3) for shape in _run_train_decode(loader_pack, True))
    # the CPU graph's ROI decode yields the crop window only (resized later in the graph)
    assert all(len(shape) == 3 and shape[2] == 3 for shape in _run_train_decode(loader_pack, False))


def test_decoder_padding_fits_the_pack_images():
    from hamengine.loaders.kinds.dali import _decoder_padding

    assert _decoder_padding((450, 600)) >= 2 * 450 * 600 * 3
    assert _decoder_padding((450, 600)) % (1 << 20) == 0
    assert _decoder_padding((8, 8)) == 1 << 20


def _fields(p) -> list[torch.Tensor]:
    return [p.box, p.angle, p.hflip, p.vflip, p.brightness, p.contrast, p.saturation, p.hue]


@pytest.mark.parametrize("fused", [False, True])
def test_ffcv_params_are_device_independent(fused):
    """The loader draws on a CPU generator seeded by (seed, epoch, rank) whatever its device; the
    CUDA path then moves one packed tensor (pack -> copy -> unpack), which must round-trip exactly."""
    from hamengine.config import AugConfig
    from hamengine.loaders.ffcv.loader import ffcv_params
    from hamengine.loaders.kinds import augment
    from hamengine.loaders.kinds.base import mix_seed

    aug = AugConfig(preset="full").effective()

    def draw(seed, epoch, rank):
        gen = torch.Generator().manual_seed(mix_seed(seed, epoch, rank, 0xFFC7))
        return ffcv_params(gen, 12, 64, aug, fused)

    a, b = draw(3, 1, 0), draw(3, 1, 0)
    for x, y in zip(_fields(a), _fields(b), strict=True):
        assert torch.equal(x, y) and x.device.type == "cpu"
    assert not torch.equal(draw(3, 2, 0).angle, a.angle)  # the epoch changes the draws
    sim = augment.unpack_params(augment.pack_params(a).clone())  # what params_to does on CUDA
    for x, y in zip(_fields(a), _fields(sim), strict=True):
        assert x.dtype == y.dtype and torch.equal(x.to(y.dtype), y)
    assert augment.params_to(a, torch.device("cpu")) is a
    assert not bool(a.hflip.any())
    assert bool(a.box[:, 2].eq(64).all())


def test_colour_constants_made_once_per_device():
    from hamengine.loaders.kinds import augment

    dev = torch.device("cpu")
    assert augment._consts(dev) is augment._consts(dev)
    k = augment._consts(dev)
    assert torch.allclose(k.yiq @ k.yiq_inv, torch.eye(3), atol=1e-5)


def test_wrap_ddp_single_process_and_cuda_arguments(monkeypatch):
    from hamengine.engine.train.distributed import DistInfo, wrap_ddp

    model = torch.nn.Linear(4, 2)
    assert wrap_ddp(model, DistInfo(), torch.device("cpu")) is model  # one rank: no wrapper
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self, module, **kw):
            super().__init__()
            seen.update(kw)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", Recorder)
    wrap_ddp(model, DistInfo(1, 2, 1), torch.device("cuda", 1))
    assert seen == {"device_ids": [1], "gradient_as_bucket_view": True}
    seen.clear()
    wrap_ddp(model, DistInfo(1, 2, 1), torch.device("cpu"))
    assert seen == {"device_ids": None, "gradient_as_bucket_view": True}


def test_wrap_ddp_trains_on_gloo():
    import socket

    import torch.distributed as dist

    from hamengine.engine.train.distributed import DistInfo, wrap_ddp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 2)
        ddp = wrap_ddp(model, DistInfo(0, 2, 0), torch.device("cpu"))  # enabled: wraps
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        ddp(torch.randn(3, 4)).sum().backward()
        assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_bench_train_dali_and_a_failing_loader(monkeypatch, loader_pack):
    pytest.importorskip("nvidia.dali")
    from hamengine.bench.train import run_bench_train
    from hamengine.config import Balance, CompileMode, LoaderKind, Precision, TrainConfig

    def cfg(kind):
        return TrainConfig(pack=str(loader_pack), model="resnet18", loader=kind, size=32, batch_size=8,
                           amp=False, amp_dtype=Precision("fp32"), compile=CompileMode("off"), workers=1,
                           device="cpu", balance=Balance.SAMPLER, pretrained=False)

    res = run_bench_train(cfg(LoaderKind.DALI), steps=1, warmup=1)
    assert res["error"] is None and res["loader"] == "dali" and res["img_per_s"] > 0
    assert any("balanced" in n for n in res["notes"])  # dali cannot sample by weight: timed unweighted

    from hamengine.loaders.kinds.resident import ResidentLoader

    def boom(self):
        raise RuntimeError("simulated loader failure")
        yield  # pragma: no cover

    monkeypatch.setattr(ResidentLoader, "__iter__", boom)
    res = run_bench_train(cfg(LoaderKind.RESIDENT), steps=1, warmup=1)
    assert res["error"] == "RuntimeError: simulated loader failure"
    assert res["img_per_s"] is None and res["synthetic_img_per_s"] > 0


def test_stream_prefetcher_same_items_same_order_one_ahead():
    """The wrapper runs one item ahead (item k+1 is produced before item k is handed over) and still
    yields every item once, in order; an early break leaves the source unfinished."""
    from hamengine.loaders.kinds.stream import StreamPrefetcher

    produced: list[int] = []

    def source():
        for k in range(5):
            produced.append(k)
            yield torch.full((2,), k), k

    seen = []
    for x, k in StreamPrefetcher(source, torch.device("cpu")):
        seen.append(k)
        assert torch.equal(x, torch.full((2,), k))
        assert produced[-1] == min(k + 1, 4)  # the next one is already built
    assert seen == list(range(5))
    produced.clear()
    for _x, k in StreamPrefetcher(source, torch.device("cpu")):
        if k == 1:
            break
    assert produced == [0, 1, 2]


def test_resident_in_process_batches_unchanged_by_the_prefetcher(loader_pack):
    from hamengine.loaders import build_loader

    ld = build_loader(Pack(loader_pack), "train", LoaderConfig(kind="resident", size=32, batch_size=8, workers=1,
                                                               dtype="fp32", seed=2), "cpu")
    ld.set_epoch(1)
    direct = [(x.clone(), y.clone()) for x, y in ld._in_process()]
    wrapped = list(ld)
    assert len(direct) == len(wrapped) == len(ld)
    for (a, ya), (b, yb) in zip(direct, wrapped, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    ld.close()
