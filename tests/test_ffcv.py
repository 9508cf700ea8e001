"""FFCV backend: the .beton export (same samples, labels and JPEG bytes as the pack; deterministic;
damage caught early), the `ffcv` loader (contract, eval agreement with `resident`, DDP shares) and a
short training run that learns. Without FFCV only the install-hint test runs (the rest skip).

numba compiles every FFCV pipeline on its first epoch (several seconds each on 2 cores), so the
tests share one pack, one export and one eval loader."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hamengine.config import AugConfig, AugPreset, LoaderConfig, LoaderKind
from hamengine.errors import ConfigError
from hamengine.loaders.pack.records import Pack

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # resident's decoder

HAVE_FFCV = importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(
    not HAVE_FFCV, reason="FFCV is not installed (optional extra): run `bash .ci/install-ffcv.sh .venv`")

S = 56  # from a 72 px pack: 0.78x, like 256 -> 224 a downscale; FFCV vs resident eval ~0.024
BS = 16


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hamengine.config import PackConfig
    from hamengine.loaders.ingest.synth import synthesize
    from hamengine.loaders.pack.writer import pack_dataset

    root = tmp_path_factory.mktemp("ffcv")
    # 560 small images: enough val samples (84) for a stable balanced accuracy in the training test
    src = synthesize(root / "src", n=560, seed=5, size=(160, 120), progress=False)
    pack_dataset(PackConfig(source=str(src), out=str(root / "pack"), size=72, workers=2), progress=False)
    return root / "pack"


@pytest.fixture(scope="module")
def before_export(pack_path: Path) -> tuple[str, bytes]:
    """The pack's fingerprint and manifest bytes as `hamengine pack` left them."""
    return Pack(pack_path).fingerprint, (pack_path / "manifest.json").read_bytes()


@pytest.fixture(scope="module")
def exported(pack_path: Path, before_export: tuple[str, bytes]) -> dict:
    from hamengine.loaders.ffcv.export import export_ffcv

    return export_ffcv(pack_path, progress=False)


def cfg_for(**kw) -> LoaderConfig:
    base = dict(kind=LoaderKind.FFCV, size=S, batch_size=BS, workers=2, dtype="fp32")
    base.update(kw)
    return LoaderConfig(**base)


def build(pack: Pack, split: str, cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
    """Through build_loader, the public entry point -- or the class itself while build_loader
    does not dispatch the `ffcv` kind yet."""
    from hamengine.loaders import build_loader

    try:
        return build_loader(pack, split, cfg, "cpu", rank=rank, world_size=world_size)
    except ConfigError as e:
        if "not provided" not in str(e):
            raise
    from hamengine.loaders.ffcv.loader import FFCVLoader

    return FFCVLoader(pack, split, cfg, torch.device("cpu"), rank, world_size, workers=cfg.workers)


@pytest.fixture(scope="module")
def val_loader(pack_path: Path, exported: dict):
    loader = build(Pack(pack_path), "val", cfg_for())
    yield loader
    loader.close()


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.float(), y) for x, y in loader], strict=True)
    return torch.cat(xs), torch.cat(ys)


# -- without FFCV ---------------------------------------------------------------------------------
def test_missing_ffcv_says_how_to_install(pack_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hamengine.loaders.ffcv.export import require_ffcv
    from hamengine.loaders.ffcv.loader import FFCVLoader

    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now raises ImportError
    for attempt in (require_ffcv, lambda: FFCVLoader(Pack(pack_path), "val", cfg_for(), torch.device("cpu"))):
        with pytest.raises(ConfigError) as info:
            attempt()
        msg = str(info.value)
        assert "pip install 'hamengine[ffcv]'" in msg and ".ci/install-ffcv.sh" in msg
        assert "libturbojpeg0-dev" in msg and "--loader resident" in msg


# -- export -----------------------------------------------------------------------------------------
@needs_ffcv
def test_beton_holds_the_packs_samples_labels_and_bytes(pack_path: Path, exported: dict,
                                                        before_export: tuple[str, bytes]) -> None:
    import json

    from ffcv.reader import Reader
    from PIL import Image

    pack = Pack(pack_path)
    # Recorded in the pack's manifest with every file's sha256; the rest of the manifest and the
    # fingerprint (resident cache keys, run records) are unchanged.
    manifest = json.loads((pack_path / "manifest.json").read_bytes())
    assert manifest["exports"]["ffcv"] == exported
    assert {k: v for k, v in manifest.items() if k != "exports"} == json.loads(before_export[1])
    assert pack.fingerprint == before_export[0]
    assert set(exported["splits"]) == {"train", "val", "test"}
    for split, info in exported["splits"].items():
        path = pack_path / "ffcv" / info["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
        reader = Reader(str(path))
        n = pack.num_samples(split)
        assert int(reader.num_samples) == n == info["samples"]
        assert type(reader.handlers["image"]).__name__ == "RGBImageField"  # a plain FFCV field on disk
        image_meta, labels = (reader.metadata[name] for name in reader.metadata.dtype.names)
        assert np.array_equal(labels, pack.labels(split))
        table = np.sort(reader.alloc_table, order="sample_id")
        assert np.array_equal(table["sample_id"], np.arange(n))  # one allocation per sample
        blob = path.read_bytes()
        for i in range(n):
            stored = blob[int(table["ptr"][i]):int(table["ptr"][i] + table["size"][i])]
            assert stored == pack.jpeg(split, i), (split, i)  # the pack's JPEG, byte for byte
            assert image_meta["mode"][i] == 0  # FFCV's jpg mode
            w, h = Image.open(io.BytesIO(stored)).size
            assert (image_meta["width"][i], image_meta["height"][i]) == (w, h)


@needs_ffcv
def test_export_is_deterministic_and_kept_when_current(pack_path: Path, exported: dict, tmp_path: Path) -> None:
    from hamengine.loaders.ffcv.export import export_ffcv

    files = sorted((pack_path / "ffcv").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert export_ffcv(pack_path, progress=False) == exported  # up to date: nothing rewritten
    assert [f.stat().st_mtime_ns for f in files] == stamps
    copy = tmp_path / "pack"
    shutil.copytree(pack_path, copy, ignore=shutil.ignore_patterns("ffcv", "cache"))
    again = export_ffcv(copy, progress=False)  # a fresh export of the same pack: the same bytes
    assert {s: i["sha256"] for s, i in again["splits"].items()} == \
        {s: i["sha256"] for s, i in exported["splits"].items()}


@needs_ffcv
def test_damaged_or_missing_export_fails_early(pack_path: Path, exported: dict, tmp_path: Path) -> None:
    import json

    from hamengine.loaders.ffcv.export import beton_for
    from hamengine.loaders.pack.ffcv_record import FFCVExportError, check_export
    from hamengine.loaders.pack.records import manifest_bytes
    from hamengine.loaders.pack.verify import verify_pack

    copy = tmp_path / "pack"
    shutil.copytree(pack_path, copy, ignore=shutil.ignore_patterns("cache"))
    pack = Pack(copy)
    beton = copy / "ffcv" / "val.beton"
    assert check_export(pack) == [] and verify_pack(copy, quick=True).exports == ["ffcv"]
    data = bytearray(beton.read_bytes())
    data[len(data) // 2] ^= 0xFF
    beton.write_bytes(bytes(data))
    with pytest.raises(FFCVExportError, match="export-ffcv .* --force"):
        beton_for(pack, "val")
    assert len(check_export(pack)) == 1 and "val.beton" in check_export(pack)[0]
    report = verify_pack(copy, quick=True)
    assert report.fault is not None and "val.beton" in report.fault.message
    (copy / "ffcv" / "test.beton").unlink()  # a partial export is not used: exported again on demand
    with pytest.raises(FFCVExportError, match="hamengine export-ffcv"):
        beton_for(pack, "test", auto_export=False)
    # Repacking rewrites the manifest without the record: no export until one is made again.
    manifest = json.loads((copy / "manifest.json").read_bytes())
    del manifest["exports"]
    (copy / "manifest.json").write_bytes(manifest_bytes(manifest))
    assert check_export(pack) == [] and verify_pack(copy, quick=True).exports == []
    with pytest.raises(FFCVExportError, match="records no complete FFCV export"):
        beton_for(pack, "val", auto_export=False)


@needs_ffcv
def test_export_command(pack_path: Path, exported: dict) -> None:
    import json

    from click.testing import CliRunner

    from hamengine.commands.ffcv import export_ffcv

    ok = CliRunner().invoke(export_ffcv, [str(pack_path), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["splits"]["val"]["sha256"] == exported["splits"]["val"]["sha256"]
    from hamengine.cli import cli  # errors from the library are shown by the command group

    bad = CliRunner().invoke(cli, ["export-ffcv", str(pack_path.parent / "nope")])
    assert bad.exit_code == 1 and "no such pack folder" in bad.output


# -- loader -------------------------------------------------------------------------------------
@needs_ffcv
def test_eval_contract_and_agreement_with_resident_and_dali(pack_path: Path, val_loader) -> None:
    from hamengine.loaders import build_loader

    pack = Pack(pack_path)
    n = pack.num_samples("val")
    x, y = epoch(val_loader)
    assert x.shape == (n, 3, S, S) and val_loader.num_samples == n and len(val_loader) == math.ceil(n / BS)
    assert np.array_equal(y.numpy(), pack.labels("val"))  # every sample once, in storage order
    first = next(iter(val_loader))
    assert first[0].dtype == torch.float32 and first[0].is_contiguous() and first[1].dtype == torch.int64
    assert torch.equal(epoch(val_loader)[0], x)  # eval is deterministic
    for kind in ("resident", "dali"):  # the cross-loader tolerance (JPEG decoder + resize filter)
        ref, labels = epoch(build_loader(pack, "val", LoaderConfig(kind=kind, size=S, batch_size=BS, workers=2,
                                                                   dtype="fp32"), "cpu"))
        assert torch.equal(labels, y) and (x - ref).abs().mean() < 0.03, kind


@needs_ffcv
def test_eval_ddp_shares_cover_the_split_once(pack_path: Path, exported: dict) -> None:
    from hamengine.loaders.kinds.base import eval_batch_sizes, eval_share

    pack = Pack(pack_path)
    n = pack.num_samples("test")
    def splits_last_batch(w: int, b: int) -> bool:
        """Does some rank of w, at batch size b, split its last batch to match the others' count?"""
        return any(len(eval_batch_sizes(n, r, w, b)) > math.ceil(np.subtract(*eval_share(n, r, w)[::-1]) / b)
                   for r in range(w))

    world, bs = next((w, b) for w in (2, 3) for b in range(2, n) if splits_last_batch(w, b))
    ys, counts = [], set()
    for rank in range(world):
        loader = build(pack, "test", cfg_for(batch_size=bs, workers=1), rank, world)
        sizes = [len(y) for _, y in loader]
        assert sizes == eval_batch_sizes(n, rank, world, bs)
        counts.add(len(sizes))
        ys.append(epoch(loader)[1])
        loader.close()
    assert len(counts) == 1  # every rank the same number of batches
    assert np.array_equal(torch.cat(ys).numpy(), pack.labels("test"))  # disjoint and complete


@needs_ffcv
@pytest.mark.slow
def test_training_with_ffcv_learns(pack_path: Path, val_loader) -> None:
    """Full augmentation (FFCV crop + flip, rotation / vflip / jitter on the device) with the
    class-balanced sampler (repeated indices through FFCV): a small CNN gets well above chance."""
    from sklearn.metrics import balanced_accuracy_score

    pack = Pack(pack_path)
    train = build(pack, "train", cfg_for(aug=AugConfig(preset=AugPreset.FULL), balance_sampler=True))
    assert train.train and len(train) == pack.num_samples("train") // BS
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 7))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    labels = torch.from_numpy(pack.labels("train"))
    for e in range(8):
        train.set_epoch(e)
        plan = train.plan(e).indices
        seen = []
        for x, y in train:
            assert x.shape == (BS, 3, S, S) and x.dtype == torch.float32 and y.dtype == torch.int64
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(y)
        assert torch.equal(torch.cat(seen), labels[plan])  # the epoch plan, batch for batch
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x).argmax(1) for x, _ in val_loader]).numpy()
    bacc = balanced_accuracy_score(pack.labels("val"), pred)
    # Chance: 1/7. FFCV's crop draws are unseeded, so this varies run to run: 8 epochs measured
    # 0.46-0.62 over 4 runs (4 epochs: 0.39-0.48 over 5).
    assert bacc > 0.3, bacc
    train.close()


@needs_ffcv
@pytest.mark.gpu
def test_cuda_path_contract_and_agreement(pack_path: Path, exported: dict) -> None:
    """On CUDA uint8 crosses to the GPU (FFCV's ToDevice) and flips / normalization run there."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from hamengine.loaders import build_loader
    from hamengine.loaders.ffcv.loader import FFCVLoader

    pack = Pack(pack_path)
    dev = torch.device("cuda")
    ev = FFCVLoader(pack, "val", cfg_for(dtype="bf16"), dev, workers=2)
    x, y = epoch(ev)
    first = next(iter(ev))[0]
    assert first.device.type == "cuda" and first.dtype == torch.bfloat16
    assert first.is_contiguous(memory_format=torch.channels_last)  # AUTO on CUDA
    assert np.array_equal(y.cpu().numpy(), pack.labels("val"))
    ref, _ = epoch(build_loader(pack, "val", LoaderConfig(kind="resident", size=S, batch_size=BS,
                                                          dtype="bf16"), dev))
    assert (x - ref).abs().mean() < 0.03
    tr = FFCVLoader(pack, "train", cfg_for(dtype="bf16", aug=AugConfig(preset=AugPreset.FULL)), dev, workers=2)
    xt, yt = next(iter(tr))
    assert xt.shape == (BS, 3, S, S) and xt.device.type == "cuda" and yt.device.type == "cuda"
    assert -2.2 < float(xt.float().min()) and float(xt.float().max()) < 2.7


def test_unreadable_or_hand_edited_records_give_clear_errors(pack_path: Path, tmp_path: Path) -> None:
    """No FFCV needed: the manifest side of the export. A record this version cannot read is
    reported by verify / inspect (no traceback); a hand-reformatted manifest is not re-serialized
    (that would change the pack's fingerprint)."""
    import json

    from click.testing import CliRunner

    from hamengine.commands.pack import inspect_pack, verify
    from hamengine.loaders.pack.ffcv_record import FFCVExportError, write_record

    copy = tmp_path / "pack"
    shutil.copytree(pack_path, copy, ignore=shutil.ignore_patterns("cache", "ffcv"))
    manifest = json.loads((copy / "manifest.json").read_bytes())
    manifest.pop("exports", None)
    fp = Pack(copy).fingerprint
    for bad in ({"ffcv": {"format": "hamengine-ffcv", "version": 1}}, None, {"ffcv": "x"}):
        (copy / "manifest.json").write_text(json.dumps({**manifest, "exports": bad}, indent=2) + "\n")
        assert Pack(copy).fingerprint == fp
        shown = CliRunner().invoke(inspect_pack, [str(copy), "--json"])
        assert shown.exit_code == 0, shown.output
        checked = CliRunner().invoke(verify, [str(copy), "--quick"])
        if bad is None:
            assert checked.exit_code == 0 and json.loads(shown.output)["exports"] == {}
        else:
            assert checked.exit_code == 1 and "cannot read" in checked.output and "--force" in checked.output
            assert json.loads(shown.output)["exports"] == {"ffcv": None}
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))  # reformatted by hand
    with pytest.raises(FFCVExportError, match="not in the form `hamengine pack` writes"):
        write_record(Pack(copy), {"format": "hamengine-ffcv"})


def _flock_waiters(lock: Path) -> int:
    """How many flock() calls are blocked on `lock` right now (Linux /proc/locks marks a waiter "->";
    the file is named by MAJOR:MINOR:INODE)."""
    inode = str(lock.stat().st_ino)
    waiters = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and any(
                f.count(":") == 2 and f.rsplit(":", 1)[1] == inode for f in fields):
            waiters += 1
    return waiters


def _until(condition, what: str, timeout: float = 120.0) -> None:
    """Wait for an event the code under test announces; failing (not passing) if it never comes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux /proc/locks to see a blocked flock")
@pytest.mark.parametrize("exporter", [pytest.param("export-ffcv", marks=needs_ffcv), "lock-holder"])
def test_repack_waits_for_an_export_in_progress(exporter: str, pack_path: Path, tmp_path: Path) -> None:
    """`pack --force` over a folder whose FFCV export is being written waits for it (the export
    rewrites manifest.json when it finishes: it must not put the old one back).

    The exporter is held inside its lock: a real `hamengine export-ffcv` stopped at the
    ffcv.export_locked hook (HAMENGINE_HOOKS wait:GATE), or, without FFCV, this process holding
    the same lock. The repack must then be seen blocked in flock() on the lock file -- without the
    lock it never is, and the test fails instead of depending on how long a repack takes."""
    import os
    import subprocess
    import threading

    from hamengine.config import PackConfig
    from hamengine.hooks import ENV as HOOKS
    from hamengine.loaders.pack.ffcv_record import export_lock
    from hamengine.loaders.pack.writer import pack_dataset

    copy = tmp_path / "pack"
    shutil.copytree(pack_path, copy, ignore=shutil.ignore_patterns("cache", "ffcv"))
    gate = tmp_path / "gate"
    held = contextlib.ExitStack()
    if exporter == "export-ffcv":
        proc = subprocess.Popen([sys.executable, "-m", "hamengine", "export-ffcv", str(copy), "--force"],
                                env={**os.environ, HOOKS: f"ffcv.export_locked:wait:{gate}"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        held.callback(proc.kill)  # only matters when the test fails early
        _until(lambda: Path(f"{gate}.reached").exists() or proc.poll() is not None,
               "export-ffcv to reach ffcv.export_locked")
        assert proc.poll() is None, proc.communicate()[0][-2000:]
    else:
        (copy / "ffcv").mkdir()
        held.enter_context(export_lock(copy / "ffcv"))
    before = (copy / "manifest.json").read_bytes()
    done, errors = threading.Event(), []

    def repack() -> None:
        try:
            pack_dataset(PackConfig(source=str(pack_path.parent / "src"), out=str(copy), size=72, seed=1,
                                    workers=1, force=True), progress=False)
        except BaseException as e:  # noqa: B036 -- reported by the test thread
            errors.append(e)
        done.set()

    with held:
        worker = threading.Thread(target=repack, daemon=True)
        worker.start()
        _until(lambda: _flock_waiters(copy / "ffcv" / ".export.lock") > 0 or done.is_set(),
               "the repack to wait for the export lock")
        assert not done.is_set(), f"the repack did not wait for the export in progress {errors}"
        assert (copy / "manifest.json").read_bytes() == before  # untouched while the export runs
        if exporter == "export-ffcv":
            gate.touch()  # the export goes on and finishes; then the repack gets the lock
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[-2000:]
    worker.join(300)
    assert done.is_set() and not errors, errors
    assert (copy / "manifest.json").read_bytes() != before  # seed 1: a new split
    assert Pack(copy).fingerprint != Pack(pack_path).fingerprint


@needs_ffcv
@pytest.mark.slow  # times three loaders twice: ~17 s
def test_bench_loader_puts_ffcv_in_the_same_table(pack_path: Path, exported: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`hamengine bench loader`: one JSON with every loader timed on the same pack, ratios to the
    folder baseline and to FFCV measured in the same run, and the plot. Without FFCV the others are
    still timed. (Structure only: speeds are for BENCHMARKS.md, never asserted.)"""
    import json

    from click.testing import CliRunner

    from hamengine.commands.bench import bench_loader

    args = ["--pack", str(pack_path), "--source", str(pack_path.parent / "src"), "--aug", "crop-flip",
            "--batch-size", "8", "--size", str(S), "--batches", "2", "--warmup", "1", "--workers", "2",
            "--device", "cpu", "--json"]
    plot = tmp_path / "bench.png"
    run = CliRunner().invoke(bench_loader, [*args, "--loaders", "folder,resident,ffcv", "--plot", str(plot)])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output[run.output.index("{"):])
    rows = {r["loader"]: r for r in out["results"]}
    assert list(rows) == ["folder", "resident", "ffcv"] and out["aug"] == "crop-flip"
    for name, r in rows.items():
        assert r["images"] == 2 * 8 and r["batches"] == 2
        assert r["ratio_to_folder"] == pytest.approx(r["img_per_s"] / rows["folder"]["img_per_s"]), name
        assert r["ratio_to_ffcv"] == pytest.approx(r["img_per_s"] / rows["ffcv"]["img_per_s"]), name
    assert rows["folder"]["ratio_to_folder"] == 1.0 and rows["ffcv"]["ratio_to_ffcv"] == 1.0
    assert {"cpus", "torch", "commit"} <= set(out["hardware"]) and plot.read_bytes()[:4] == b"\x89PNG"
    for r in rows.values():  # one-time costs beside the steady rate, amortized over 30 epochs
        assert r["setup_total_s"] == pytest.approx(r["setup_s"] + r["warmup_extra_s"]) and r["warmup_extra_s"] >= 0
        n30 = out["epochs_for_setup"] * _train_samples(pack_path, 8)
        assert r["img_per_s_30_epochs"] == pytest.approx(n30 / (r["setup_total_s"] + n30 / r["img_per_s"]))

    # --cold: the FFCV export is rewritten (same bytes) and the resident cache decoded in a scratch
    # folder; the pack's own cache folder is left as it was.
    beton = pack_path / "ffcv" / "train.beton"
    before = (beton.stat().st_mtime_ns, beton.read_bytes())
    cache = sorted(p.name for p in (pack_path / "cache").glob("*")) if (pack_path / "cache").is_dir() else []
    run = CliRunner().invoke(bench_loader, [*args, "--loaders", "resident,ffcv,ffcv-native", "--cold"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output[run.output.index("{"):])
    assert out["cold"] is True and all(r["cold"] for r in out["results"])
    # FFCV's own pipeline over the raw export at S is the peer column when it was timed
    cold_rows = {r["loader"]: r for r in out["results"]}
    assert out["peer"] == "ffcv-native" and cold_rows["ffcv-native"]["images"] == 2 * 8
    assert cold_rows["resident"]["ratio_to_ffcv"] == pytest.approx(
        cold_rows["resident"]["img_per_s"] / cold_rows["ffcv-native"]["img_per_s"])
    assert (pack_path / f"ffcv-raw-{S}" / "train.beton").is_file()
    assert beton.stat().st_mtime_ns != before[0] and beton.read_bytes() == before[1]
    assert (sorted(p.name for p in (pack_path / "cache").glob("*")) if (pack_path / "cache").is_dir() else []) == cache

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ffcv" else real_find_spec(name, *a))
    run = CliRunner().invoke(bench_loader, [*args, "--loaders", "resident,ffcv"])
    assert run.exit_code == 0, run.output
    assert "ffcv is not installed" in run.output
    out = json.loads(run.output[run.output.index("{"):])
    assert [r["loader"] for r in out["results"]] == ["resident"] and out["results"][0]["ratio_to_ffcv"] is None


def _train_samples(pack_path: Path, batch: int) -> int:
    from hamengine.loaders.pack.records import Pack

    return Pack(pack_path).num_samples("train") // batch * batch  # one rank, drop_last


@needs_ffcv
def test_a_record_edited_by_hand_is_not_trusted(pack_path: Path, exported: dict, tmp_path: Path) -> None:
    """A record that drops a split, or points a split at another split's file (with that file's
    size and hash), does not describe the pack: verify flags it and the loader re-exports."""
    import json

    from hamengine.loaders.ffcv.export import beton_for
    from hamengine.loaders.pack.ffcv_record import check_export
    from hamengine.loaders.pack.records import manifest_bytes

    for edit in ("drop", "swap"):
        copy = tmp_path / edit
        shutil.copytree(pack_path, copy, ignore=shutil.ignore_patterns("cache"))
        manifest = json.loads((copy / "manifest.json").read_bytes())
        splits = manifest["exports"]["ffcv"]["splits"]
        if edit == "drop":
            del splits["train"]
        else:
            splits["train"] = dict(splits["val"])
        (copy / "manifest.json").write_bytes(manifest_bytes(manifest))
        problems = check_export(Pack(copy))
        assert len(problems) == 1 and "other splits, files or sample counts" in problems[0], problems
        path = beton_for(Pack(copy), "train")  # not trusted: exported again, then recorded properly
        assert check_export(Pack(copy)) == [] and path.name == "train.beton"


@needs_ffcv
def test_raw_and_proportion_exports_are_their_own_records(pack_path: Path, exported: dict, tmp_path: Path) -> None:
    """--mode raw stores exactly the resident cache's pixels at S (so FFCV and resident read the same
    pixels); proportion is FFCV's mix; each is a separate folder and manifest record that verify
    checks, and the jpg export (what --loader ffcv reads) is untouched."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    from hamengine.loaders.ffcv.export import export_ffcv, export_name
    from hamengine.loaders.kinds.resident import cache_path, cache_shape
    from hamengine.loaders.pack.ffcv_record import check_export, export_names
    from hamengine.loaders.pack.verify import verify_pack

    copy = tmp_path / "pack"
    shutil.copytree(pack_path, copy)
    jpg_before = (copy / "ffcv" / "val.beton").read_bytes()
    pack = Pack(copy)
    with pytest.raises(ConfigError, match="--size"):
        export_name("raw")
    raw = export_ffcv(pack, mode="raw", size=S, progress=False, force=True)  # another test may have made one
    assert raw["dir"] == f"ffcv-raw-{S}" and raw["mode"] == "raw" and raw["output_size"] == S
    prop = export_ffcv(Pack(copy), mode="proportion", progress=False)
    assert prop["dir"] == "ffcv-proportion"
    pack = Pack(copy)
    assert export_names(pack.manifest) == ["ffcv", "ffcv-proportion", f"ffcv-raw-{S}"]
    assert (copy / "ffcv" / "val.beton").read_bytes() == jpg_before and pack.fingerprint == Pack(pack_path).fingerprint
    h, w = cache_shape(pack, "val", S)
    cache = np.load(cache_path(pack, "val", h, w, None))
    reader = Reader(str(copy / f"ffcv-raw-{S}" / "val.beton"))
    meta = reader.metadata["f0"]
    assert (meta["mode"] == IMAGE_MODES["raw"]).all() and (meta["height"] == h).all() and (meta["width"] == w).all()
    alloc = reader.alloc_table
    for i in (0, len(cache) // 2, len(cache) - 1):  # the stored bytes are the cache's pixels, HWC
        ptr = meta["data_ptr"][i]
        size = alloc[alloc["ptr"] == ptr]["size"][0]
        with open(copy / f"ffcv-raw-{S}" / "val.beton", "rb") as f:
            f.seek(int(ptr))
            stored = np.frombuffer(f.read(int(size)), dtype=np.uint8)[: 3 * h * w].reshape(h, w, 3)
        assert np.array_equal(stored, cache[i].transpose(1, 2, 0))
    assert verify_pack(copy, quick=True).exports == ["ffcv", "ffcv-proportion", f"ffcv-raw-{S}"]
    (copy / "ffcv-proportion" / "test.beton").unlink()
    problems = check_export(Pack(copy), "ffcv-proportion")
    assert len(problems) == 1 and "--mode proportion" in problems[0]
