"""GPU paths of the loaders (run on a GPU host: pytest -m gpu). Same small pack as test_loaders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hamengine.config import AugConfig, LoaderConfig
from hamengine.loaders import build_loader
from hamengine.loaders.pack.records import Pack

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]

S, BS = 64, 16


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory):
    from hamengine.config import PackConfig
    from hamengine.loaders.ingest.synth import synthesize
    from hamengine.loaders.pack.writer import pack_dataset

    root = tmp_path_factory.mktemp("gpu")
    src = synthesize(root / "src", n=150, seed=3, size=(200, 150), progress=False)
    pack_dataset(PackConfig(source=str(src), out=str(root / "pack"), size=80, workers=2), progress=False)
    return root / "pack"


def cfg(kind: str, **kw) -> LoaderConfig:
    base = dict(kind=kind, size=S, batch_size=BS, workers=2, dtype="bf16")
    base.update(kw)
    return LoaderConfig(**base)


def cpu_eval(pack: Pack) -> torch.Tensor:
    return torch.cat([x.float() for x, _ in build_loader(pack, "val", cfg("resident", dtype="fp32"), "cpu")])


@pytest.mark.parametrize("kind", ["resident", "dali", "torch"])
def test_gpu_contract_and_eval_agreement(pack_path, kind):
    pack = Pack(pack_path)
    tr = build_loader(pack, "train", cfg(kind), "cuda")
    x, y = next(iter(tr))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    assert x.dtype == torch.bfloat16 and x.shape == (BS, 3, S, S) and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)  # AUTO on CUDA
    assert -2.2 < float(x.float().min()) < -0.5 and 0.5 < float(x.float().max()) < 2.7
    ev = build_loader(pack, "val", cfg(kind, dtype="fp32"), "cuda")
    xs, ys = zip(*[(a.float().cpu(), b.cpu()) for a, b in ev], strict=True)
    assert np.array_equal(torch.cat(ys).numpy(), pack.labels("val"))
    # mixed (nvJPEG) decode vs libjpeg-turbo on CPU: within decoder tolerance
    assert (torch.cat(xs) - cpu_eval(pack)).abs().mean() < 0.03
    tr.close()
    ev.close()


def test_dali_gpu_output_is_channels_last_view(pack_path):
    """crop_mirror_normalize writes HWC; the NCHW view must be channels_last without a copy."""
    pack = Pack(pack_path)
    ld = build_loader(pack, "train", cfg("dali", dtype="fp16", aug=AugConfig(preset="crop-flip")), "cuda")
    x, _ = next(iter(ld))
    assert x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
    assert x.stride()[1] == 1  # channels innermost


def test_resident_gpu_cache_and_determinism(pack_path, tmp_path):
    pack = Pack(pack_path)
    c = cfg("resident", cache_dir=str(tmp_path), seed=4)
    a = build_loader(pack, "train", c, "cuda")
    assert a.cache.device.type == "cuda"
    xa = torch.cat([x.float() for x, _ in a])
    b = build_loader(pack, "train", c, "cuda")  # from the disk cache written by `a`
    xb = torch.cat([x.float() for x, _ in b])
    assert torch.equal(xa, xb)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_resident_cache_gpu_decoded_equals_cpu_decoded(pack_path, tmp_path):
    """nvJPEG on CUDA (ordered with our stream, pytorch/vision#9606) vs libjpeg on CPU threads: the
    same pixels within decoder tolerance, in two cache files named by their decoder."""
    pack = Pack(pack_path)
    c = cfg("resident", cache_dir=str(tmp_path), dtype="fp32")
    gpu = build_loader(pack, "val", c, "cuda").cache.cpu().float()
    cpu = build_loader(pack, "val", c, "cpu").cache.float()
    assert gpu.shape == cpu.shape
    assert (gpu - cpu).abs().mean() < 2.0  # uint8 levels: a few at most, from decoder rounding
    names = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert len(names) == 2 and names[0].endswith("-libjpeg.npy") and names[1].endswith("-nvjpeg.npy")


def test_resident_side_stream_prefetch_matches_in_order_building(pack_path, tmp_path):
    """Batch k+1 built on a side stream while batch k is consumed: the same batches as building each
    one on the main stream when asked."""
    pack = Pack(pack_path)
    ld = build_loader(pack, "train", cfg("resident", cache_dir=str(tmp_path), seed=5), "cuda")
    ld.set_epoch(2)
    direct = [(x.float().cpu(), y.cpu()) for x, y in ld._in_process()]
    wrapped = [(x.float() * 1, y) for x, y in ld]  # consumed on the main stream, as a step does
    wrapped = [(x.cpu(), y.cpu()) for x, y in wrapped]
    assert len(direct) == len(wrapped)
    for (a, ya), (b, yb) in zip(direct, wrapped, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
