"""Loaders: the output contract, cross-loader agreement, determinism, DDP sharding, early errors.

One small synthetic pack (conftest.py's `loader_pack`: 150 images 200x150, packed at 80 px) serves
every test; loader size 64."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hamengine.config import AugConfig, AugPreset, LoaderConfig, LoaderKind
from hamengine.errors import ConfigError
from hamengine.loaders import build_loader
from hamengine.loaders.kinds.base import eval_batch_sizes, train_order
from hamengine.loaders.pack.records import Pack, PackError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

S = 64
BS = 16


def cfg_for(kind: str, **kw) -> LoaderConfig:
    base = dict(kind=kind, size=S, batch_size=BS, workers=2, dtype="bf16")
    base.update(kw)
    return LoaderConfig(**base)


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.float(), y) for x, y in loader], strict=True)
    return torch.cat(xs), torch.cat(ys)


# Every kind that reads a pack, from the enum; ffcv (an optional extra) has tests/test_ffcv.py.
KINDS = [k.value for k in LoaderKind if k not in (LoaderKind.AUTO, LoaderKind.FOLDER, LoaderKind.FFCV)]
DETERMINISTIC = ["resident", "torch"]  # dali: order follows the pipeline seed, not set_epoch


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_contract(loader_pack, kind, dtype):
    pack_path = loader_pack
    pack = Pack(pack_path)
    tr = build_loader(pack, "train", cfg_for(kind, dtype=dtype), "cpu")
    x, y = next(iter(tr))
    want = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert x.shape == (BS, 3, S, S) and x.dtype == want and x.device.type == "cpu"
    assert x.is_contiguous()  # AUTO on CPU: NCHW
    assert y.dtype == torch.int64 and y.shape == (BS,)
    # normalized: pixel 0..1 maps into about [-2.12, 2.64]; a real batch spans a good part of it
    assert -2.2 < float(x.min()) < -0.5 and 0.5 < float(x.max()) < 2.7
    assert len(tr) == pack.num_samples("train") // BS
    assert tr.train and tr.num_samples == len(tr) * BS
    # eval: every sample once, in storage order
    ev = build_loader(pack, "val", cfg_for(kind, dtype=dtype, memory_format="channels_last"), "cpu")
    xe, ye = epoch(ev)
    assert next(iter(ev))[0].is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(ye.numpy(), pack.labels("val"))
    assert xe.shape[0] == pack.num_samples("val") == ev.num_samples
    ev.close()
    tr.close()


@pytest.mark.slow
def test_eval_agrees_across_loaders(loader_pack):
    pack = Pack(loader_pack)
    outs = {k: epoch(build_loader(pack, "test", cfg_for(k, dtype="fp32"), "cpu"))[0] for k in KINDS}
    ref = outs["resident"]
    for k, x in outs.items():
        assert (x - ref).abs().mean() < 0.03, k


@pytest.mark.slow  # about 30 s on 2 cores: every loader kind draws several augmented epochs
def test_train_statistics_agree(loader_pack):
    """Same augmentation meaning: per-channel mean/std over a few epochs agree within 0.1 (normalized
    units; std over the pixels of ~300 augmented 64 px images, measured spread ~0.03-0.05)."""
    pack = Pack(loader_pack)
    stats = {}
    for k in KINDS:
        ld = build_loader(pack, "train", cfg_for(k, dtype="fp32"), "cpu")
        xs = []
        for e in range(3):
            ld.set_epoch(e)
            xs.append(epoch(ld)[0])
        x = torch.cat(xs)
        stats[k] = (x.mean((0, 2, 3)), x.std((0, 2, 3)))
        ld.close()
    m0, s0 = stats["resident"]
    for k, (m, s) in stats.items():
        assert (m - m0).abs().max() < 0.1 and (s - s0).abs().max() < 0.1, (k, m, m0, s, s0)


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_determinism(loader_pack, kind):
    pack = Pack(loader_pack)
    a = build_loader(pack, "train", cfg_for(kind, seed=5), "cpu")
    b = build_loader(pack, "train", cfg_for(kind, seed=5), "cpu")
    (xa, ya), (xb, yb) = epoch(a), epoch(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(1)
    xa1, _ = epoch(a)
    assert not torch.equal(xa1, xa)
    assert not np.array_equal(a.plan(1).indices, a.plan(0).indices)
    a.close()
    b.close()


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_sharding(loader_pack, world):
    pack = Pack(loader_pack)
    n_train, n_val = pack.num_samples("train"), pack.num_samples("val")
    bs = 8
    # train: disjoint, equal batch counts, nearly complete (drop_last keeps < world*bs + world out)
    trains = [build_loader(pack, "train", cfg_for("resident", batch_size=bs, workers=1), "cpu", r, world)
              for r in range(world)]
    idx = [t.plan(2).indices for t in trains]
    assert len({len(t) for t in trains}) == 1
    flat = np.concatenate(idx)
    assert len(flat) == len(set(flat.tolist()))
    assert len(flat) > n_train - world * bs - world
    assert [sum(1 for _ in t) for t in trains] == [len(trains[0])] * world
    # eval: every sample exactly once across ranks, same batch counts on every rank
    for kind in KINDS:
        cfg = cfg_for(kind, batch_size=bs, dtype="fp32", workers=1)  # 1: few processes to start
        vals = [build_loader(pack, "val", cfg, "cpu", r, world) for r in range(world)]
        outs = [epoch(v) for v in vals]
        assert len({len(v) for v in vals}) == 1
        assert [sum(1 for _ in v) for v in vals] == [len(vals[0])] * world
        labels = torch.cat([o[1] for o in outs]).numpy()
        assert np.array_equal(labels, pack.labels("val"))
        single = epoch(build_loader(pack, "val", cfg, "cpu"))[0]
        assert torch.equal(torch.cat([o[0] for o in outs]), single)
        assert sum(v.num_samples for v in vals) == n_val
        for v in vals:
            v.close()


def test_plan_helpers():
    for n, world, bs in [(25, 2, 8), (33, 2, 16), (10, 3, 4), (7, 3, 16), (5, 3, 1)]:
        sizes = [eval_batch_sizes(n, r, world, bs) for r in range(world)]
        assert len({len(s) for s in sizes}) == 1
        assert sum(map(sum, sizes)) == n
        assert all(0 <= b <= bs for s in sizes for b in s)
    labels = np.array([0] * 90 + [1] * 10)
    bal = train_order(labels, seed=0, epoch=0, rank=0, world_size=1, batch_size=10, balance=True)
    assert len(bal) == 100 and 0.35 < labels[bal].mean() < 0.65  # ~50% minority after balancing
    plain = train_order(labels, seed=0, epoch=0, rank=0, world_size=1, batch_size=10, balance=False)
    assert sorted(plain.tolist()) == list(range(100))


def test_balance_sampler(loader_pack):
    pack = Pack(loader_pack)
    ld = build_loader(pack, "train", cfg_for("resident", balance_sampler=True, batch_size=8), "cpu")
    counts = np.bincount(np.concatenate([ld.plan(e).indices for e in range(20)]), minlength=0)
    per_class = np.bincount(pack.labels("train")[np.nonzero(counts)[0]].repeat(counts[counts > 0]),
                            minlength=len(pack.classes))
    present = np.bincount(pack.labels("train"), minlength=len(pack.classes)) > 0
    share = per_class[present] / per_class.sum()
    assert share.max() < 2.5 / present.sum()  # close to uniform over the classes present
    _, y = next(iter(ld))
    assert y.shape == (8,)


def test_resident_cache_reused(loader_pack, tmp_path, monkeypatch):
    from hamengine.loaders.kinds import resident

    pack = Pack(loader_pack)
    cfg = cfg_for("resident", cache_dir=str(tmp_path / "cache"))
    x1, _ = epoch(build_loader(pack, "val", cfg, "cpu"))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("decoded although the cache exists")

    monkeypatch.setattr(resident, "decode_split", boom)
    x2, _ = epoch(build_loader(pack, "val", cfg, "cpu"))
    assert torch.equal(x1, x2)


def _copy(pack_path: Path, dst: Path) -> Path:
    shutil.copytree(pack_path, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


@pytest.mark.parametrize("kind", KINDS)
def test_missing_shard_fails_early(loader_pack, tmp_path, kind):
    p = _copy(loader_pack, tmp_path / "p")
    (p / "train-000000.tar").unlink()
    with pytest.raises(PackError, match="train-000000.tar.*missing"):
        build_loader(p, "train", cfg_for(kind), "cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_hash_fails_early(loader_pack, tmp_path, kind):
    p = _copy(loader_pack, tmp_path / "p")
    shard = p / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(PackError, match="val-000000.tar.*sha256"):
        build_loader(p, "val", cfg_for(kind, cache_dir=str(tmp_path / "c")), "cpu")


def test_crop_flip_and_none_presets(loader_pack):
    pack = Pack(loader_pack)
    for preset in (AugPreset.CROP_FLIP, AugPreset.NONE):
        ld = build_loader(pack, "train", cfg_for("resident", aug=AugConfig(preset=preset)), "cpu")
        x, _ = next(iter(ld))
        assert x.shape == (BS, 3, S, S) and torch.isfinite(x.float()).all()


@pytest.mark.parametrize(("preset", "fmt"), [(AugPreset.CROP_FLIP, "auto"), (AugPreset.FULL, "auto"),
                                           (AugPreset.CROP_FLIP, "channels_last")])
def test_resident_recycled_batches(loader_pack, preset, fmt):
    """recycle_batches: the CPU workers write train batches into a ring of shared buffers. The
    batches equal those in fresh memory, and a yielded batch stays intact while RING_SPARE - 1 more
    are read, across epoch boundaries; later its slot holds a newer batch (the ring is in use).
    A channels_last ring is written in that layout by the workers (no conversion afterwards)."""
    from hamengine.loaders.kinds.resident import RING_SPARE

    pack = Pack(loader_pack)
    aug = AugConfig(preset=preset)
    fresh = build_loader(pack, "train", cfg_for("resident", aug=aug, seed=3), "cpu")
    ring = build_loader(pack, "train", cfg_for("resident", aug=aug, seed=3, recycle_batches=True,
                                               memory_format=fmt), "cpu")
    assert fresh.ring_slots == 0 and ring.ring_slots > RING_SPARE
    want, kept = [], []
    for e in range(3):
        fresh.set_epoch(e)
        ring.set_epoch(e)
        want += [x.clone() for x, _ in fresh]
        for x, _ in ring:
            assert x.is_contiguous(memory_format=torch.channels_last if fmt == "channels_last"
                                   else torch.contiguous_format)
            kept.append(x)
            for i in range(max(0, len(kept) - RING_SPARE), len(kept)):  # the last RING_SPARE reads
                assert torch.equal(kept[i], want[i]), (e, i)
    assert len(kept) == len(want) > ring.ring_slots
    assert torch.equal(kept[0], want[ring.ring_slots])  # batch 0's slot now holds batch R
    fresh.close()
    ring.close()


def test_unknown_split_and_kind(loader_pack):
    with pytest.raises(PackError, match="no split 'holdout'"):
        build_loader(loader_pack, "holdout", cfg_for("resident"), "cpu")
    with pytest.raises(ConfigError, match="--loader 'nope': unknown loader kind"):
        build_loader(loader_pack, "train", cfg_for("nope"), "cpu")


def test_folder_baseline(loader_pack, synth_source):
    pack_path, src = loader_pack, synth_source
    pack = Pack(pack_path)
    tr = build_loader(pack, "train", cfg_for("folder", source=str(src)), "cpu")
    x, y = next(iter(tr))
    assert x.shape == (BS, 3, S, S) and x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert -2.2 < float(x.min()) < -0.5 and 0.5 < float(x.max()) < 2.7
    ev = build_loader(pack, "val", cfg_for("folder", source=str(src), dtype="fp32"), "cpu")
    xe, ye = epoch(ev)
    assert np.array_equal(ye.numpy(), pack.labels("val"))
    # same images as the pack (the pack re-encodes a smaller copy: agreement is loose, not exact)
    xr, _ = epoch(build_loader(pack, "val", cfg_for("resident", dtype="fp32"), "cpu"))
    assert (xe - xr).abs().mean() < 0.1
    tr.close()
    ev.close()
    with pytest.raises(ConfigError, match="source"):
        build_loader(pack, "val", cfg_for("folder"), "cpu")


def test_auto_choice(loader_pack):
    from hamengine.loaders.build import choose_kind

    pack = Pack(loader_pack)
    assert choose_kind(pack, "train", cfg_for("auto"), torch.device("cpu")).value == "resident"
    tiny = 1e-9  # GB: nothing fits
    assert choose_kind(pack, "train", cfg_for("auto", memory_budget_gb=tiny), torch.device("cpu")).value == "dali"
    assert choose_kind(pack, "train", cfg_for("auto", memory_budget_gb=tiny, balance_sampler=True),
                       torch.device("cpu")).value == "torch"
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        build_loader(loader_pack, "val", cfg_for("resident", memory_budget_gb=tiny), "cpu")
    with pytest.raises(ConfigError, match="balance"):
        build_loader(loader_pack, "train", cfg_for("dali", balance_sampler=True), "cpu")
    ld = build_loader(str(loader_pack), "val", cfg_for("auto"), "cpu")  # a path works too
    assert ld.kind == "resident"


@pytest.mark.parametrize("kind", ["torch", "resident"])
def test_a_dropped_loader_stops_its_workers_at_once(loader_pack, kind):
    """A loader dropped mid-epoch without close() stops its worker processes when its last reference
    goes (no reference cycle left to the cycle collector, whose order let the DataLoader's own
    finalizer wait ~5 s per worker)."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    tr = build_loader(loader_pack, "train", cfg_for(kind, workers=2), "cpu")
    next(iter(tr))
    workers = set(multiprocessing.active_children()) - before
    assert workers and all(w.is_alive() for w in workers)
    del tr  # refcount only: no gc.collect()
    assert not any(w.is_alive() for w in workers)
