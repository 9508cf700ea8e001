"""`hamengine bench loader`: images/s and per-batch latency of each loader kind, side by side.

Every loader reads the same pack split with the same augmentation preset, batch size and output
size; `folder` (the per-file PIL baseline over the original download) is the reference, and each
loader's ratio to it is measured in the same run. Set-up time (worker start, DALI build, the
resident cache's decode or load) is reported apart from the timed batches, which start after a
warm-up. On CUDA every batch is synchronized before its time is taken.

What a user waits for is more than the steady rate: each loader's one-time set-up is
`setup_s` (build: worker start, DALI pipeline build, the resident cache's decode -- or its load from
disk -- and, with `cold`, the FFCV export) plus `warmup_extra_s` (what the warm-up batches cost beyond
the steady rate: numba compiling FFCV's pipeline, worker and allocator warm-up). `img_per_s_30_epochs`
is the split read 30 times, set-up included. `cold` (bench loader --cold) makes every one-time cost
happen in the run: the resident cache is decoded into a fresh temporary folder (the pack's own
cache is neither read nor touched) and the FFCV export is rewritten (deterministic: same bytes).
"""
from __future__ import annotations

import gc
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hamengine.bench import BenchError
from hamengine.bench.ffcv_native import NATIVE_KINDS, FFCVNative
from hamengine.config import AugConfig, LoaderConfig, LoaderKind, MemoryFormat, TrainConfig
from hamengine.engine.runtime.environment import hardware
from hamengine.engine.runtime.execution import resolve_execution
from hamengine.errors import ConfigError, UserError
from hamengine.loaders import build_loader
from hamengine.loaders.ffcv.export import export_ffcv

# The engine's kinds (the `folder` baseline first) and the FFCV peer's own pipelines (bench/ffcv_native.py).
KINDS = (LoaderKind.FOLDER.value, *(k.value for k in LoaderKind if k not in (LoaderKind.AUTO, LoaderKind.FOLDER)),
         *NATIVE_KINDS)
EPOCHS_FOR_SETUP = 30  # img_per_s_30_epochs: a short HAM10000 schedule, set-up amortized over it


def tree_cpu_seconds(pid: int | None = None) -> float:
    """user+system CPU seconds of this process and its live descendants (Linux /proc; 0 elsewhere).
    Loader workers are persistent, so their CPU time over the timed window is counted. CPU time per
    image is the figure that survives a busy machine; images/s is the one to quote on an idle one."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [pid or os.getpid()]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def time_loader(kind: str, pack: str, split: str, cfg_kw: dict[str, Any], device: str, batches: int,
                warmup: int, min_seconds: float = 0.0, cold: bool = False) -> dict[str, Any]:
    """Build one loader, skip `warmup` batches, time the next `batches` and then more until the timed
    batches add up to `min_seconds` (epochs wrap as needed): at 20,000+ img/s, 20 batches last well
    under a second, too short to measure a rate rather than guess it."""
    import shutil
    import tempfile

    import torch


    native = NATIVE_KINDS.get(kind)
    decodes = kind == "resident" or native == "raw"  # builds a resident cache: cold = in a scratch folder
    scratch = tempfile.mkdtemp(prefix="hamengine-bench-cache-") if cold and decodes else None
    cfg = LoaderConfig(kind="auto" if native else kind, **cfg_kw, **({"cache_dir": scratch} if scratch else {}))
    t0 = time.perf_counter()
    if cold and (kind == "ffcv" or native):

        # the export is part of FFCV's set-up (raw: with the resident cache decode it reads)
        try:
            export_ffcv(pack, force=True, progress=False, mode=native or "jpg",
                        size=cfg.size if native == "raw" else None, cache_dir=scratch)
        except BaseException:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
    try:
        loader = FFCVNative(pack, split, cfg, device, native) if native else build_loader(pack, split, cfg, device)
    except BaseException:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    setup_s = time.perf_counter() - t0
    kernel = getattr(loader, "train_kernel", None)  # resident: which crop-flip kernel ran
    warm_s, warm_batches = 0.0, 0
    cuda = loader.device.type == "cuda"
    cpu_s = 0.0
    lat: list[float] = []
    images = 0
    epoch = 0
    cpu0 = tree_cpu_seconds() if warmup == 0 else None
    timed = 0.0  # sum(lat), kept as it grows

    def done() -> bool:
        return len(lat) >= batches and timed >= min_seconds

    try:
        while not done():
            loader.set_epoch(epoch)
            last = time.perf_counter()
            seen = 0
            for x, _y in loader:
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                seen += 1
                if warmup > 0:
                    warmup -= 1
                    warm_s += now - last
                    warm_batches += 1
                    if warmup == 0:
                        cpu0 = tree_cpu_seconds()
                else:
                    lat.append(now - last)
                    timed += now - last
                    images += int(x.shape[0])
                    if done():
                        cpu_s = tree_cpu_seconds() - (cpu0 or 0.0)
                        break
                last = time.perf_counter()
            if seen == 0:
                raise BenchError(f"loader {kind}: the {split} split yields no batches (fewer images than "
                                 f"--batch-size {cfg.batch_size}?)")
            epoch += 1
        epoch_images = loader.num_samples
    finally:
        loader.close()
        del loader
        gc.collect()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    total = float(sum(lat))
    ms = np.asarray(lat) * 1000
    rate = images / total if total else 0.0
    # warm-up batches beyond what they would cost at the steady rate (numba compile, worker warm-up)
    warmup_extra_s = max(0.0, warm_s - warm_batches * (total / len(lat) if lat else 0.0))
    once = setup_s + warmup_extra_s
    n30 = EPOCHS_FOR_SETUP * epoch_images
    return {"loader": kind, "img_per_s": rate, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "batches": len(lat), "images": images,
            "setup_s": setup_s, "warmup_extra_s": warmup_extra_s, "setup_total_s": once, "cold": cold,
            "img_per_s_30_epochs": n30 / (once + n30 / rate) if rate else 0.0,
            "cpu_ms_per_img": 1000 * cpu_s / images if images else 0.0, "kernel": kernel}


def failed_result(kind: str, exc: BaseException) -> dict[str, Any]:
    """A kind that could not be timed: its error, and None for every figure (JSON null, table '-')."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return {"loader": kind, "error": f"{type(exc).__name__}: {msg}", "img_per_s": None, "p50_ms": None,
            "p99_ms": None, "batches": 0, "images": 0, "setup_s": None, "warmup_extra_s": None,
            "setup_total_s": None, "img_per_s_30_epochs": None, "cpu_ms_per_img": None,
            "ratio_to_folder": None, "ratio_to_ffcv": None, "cpu_ratio_to_folder": None, "kernel": None,
            "_exc": exc}


def plot_results(results: list[dict[str, Any]], aug: str, path: str, title_extra: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["loader"] for r in results]
    vals = [r["img_per_s"] for r in results]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar(names, vals, color="#4c72b0")
    for b, r in zip(bars, results, strict=True):
        ratio = r.get("ratio_to_folder")
        label = f"{r['img_per_s']:.0f}" + (f"\n{ratio:.2f}x" if ratio is not None else "")
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(f"loader throughput, --aug {aug} ({title_extra})", fontsize=9)
    ax.set_ylim(0, max(vals) * 1.25 if vals else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class LoaderBench:
    """What `bench loader` times: every kind in `kinds` over the same pack, split and options."""

    pack: str
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    source: str | None = None  # the original download: the `folder` baseline reads it
    split: str = "train"
    aug: str = "full"
    batch_size: int = 128
    size: int = 224
    batches: int = 20
    warmup: int = 3
    min_seconds: float = 0.0  # keep timing batches until they add up to this
    cold: bool = False  # make every one-time cost happen in the run (fresh resident cache, FFCV re-export)
    workers: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: what `train` would hand hamnet at this side and batch here (resolve_execution)


def resolve_bench_dtype(b: LoaderBench) -> tuple[str, str, str | None]:
    """--dtype auto -> the precision and memory format the engine's plan trains hamnet in at this side
    and batch on this host (a CPU without native bf16 gets fp32 batches, as its trainings do), with
    the plan's reason; a forced dtype keeps the loaders' own format rule (channels_last on CUDA)."""
    if b.dtype != "auto":
        return b.dtype, "auto", None

    ex = resolve_execution(TrainConfig(model="hamnet", size=b.size, batch_size=b.batch_size, device=b.device))
    fmt = "channels_last" if ex.channels_last else "contiguous"
    return ex.precision.value, fmt, (f"dtype auto -> {ex.precision.value}, {fmt} (hamnet's plan here: "
                                     f"{ex.plan.why['amp']}; {ex.plan.why['channels_last']})")


def run_bench_loader(b: LoaderBench, plot: str | None = None,
                     log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Time each loader of `b`; returns {"results": [...], ratios, hardware, "notes": [...]}. A
    loader that cannot run is a BenchError naming it; a missing optional FFCV is a note."""

    kinds = list(b.kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"--loaders: unknown kind(s) {', '.join(bad) or '(none)'}; choose from {', '.join(KINDS)}")
    if "folder" in kinds and not b.source:
        raise ConfigError("--loaders includes folder: pass --source DIR (the HAM10000 folder the pack was built from)")
    notes = []
    ffcv_kinds = [k for k in kinds if k.startswith("ffcv")]
    if ffcv_kinds and importlib.util.find_spec("ffcv") is None:
        # Optional peer: time the others and say why ffcv is missing rather than failing the run.
        notes.append(f"ffcv is not installed (pip install 'hamengine[ffcv]'); timing the other loaders "
                     f"(skipped: {', '.join(ffcv_kinds)})")
        kinds = [k for k in kinds if k not in ffcv_kinds]
    if any(k in kinds for k in ("ffcv-native", "ffcv-native-jpg")):
        notes.append("ffcv-native: FFCV's own ops only (random resized crop, horizontal flip, NormalizeImage "
                     "to fp16); no vertical flip, rotation or colour jitter: compare it under --aug crop-flip")
    dtype, memory_format, why = resolve_bench_dtype(b)
    if why:
        notes.append(why)
    # recycle_batches: the loader may reuse a batch's memory as the trainer lets it (FFCV does too)
    cfg_kw = dict(size=b.size, batch_size=b.batch_size, aug=AugConfig(preset=b.aug), dtype=dtype,
                  memory_format=MemoryFormat(memory_format),
                  workers=b.workers, source=b.source, recycle_batches=True)
    results: list[dict[str, Any]] = []
    for kind in kinds:
        log(f"timing {kind} ...")
        try:
            results.append(time_loader(kind, b.pack, b.split, cfg_kw, b.device, b.batches, b.warmup,
                                       b.min_seconds, b.cold))
        except Exception as e:  # noqa: BLE001 -- one broken kind (build or a batch) must not cost the others' numbers
            log(f"loader {kind} failed: {type(e).__name__}: {e}")
            results.append(failed_result(kind, e))
    ok = [r for r in results if r.get("error") is None]
    if not ok:  # nothing measured: a user error (bad pack, options) is most likely the same for all
        first = results[0]["_exc"]
        if isinstance(first, UserError):
            raise BenchError(f"loader {results[0]['loader']}: {first}", first.exit_code) from first
        raise BenchError("every loader failed: " + "; ".join(f"{r['loader']}: {r['error']}" for r in results))
    for r in results:
        r.pop("_exc", None)
    ref = next((r for r in ok if r["loader"] == "folder"), None)
    # The peer column: FFCV at its strongest that was timed (its own pipeline over raw pixels, then
    # over JPEGs, then FFCV through our ops).
    peer = next((r for name in ("ffcv-native", "ffcv-native-jpg", "ffcv") for r in ok if r["loader"] == name), None)
    for r in ok:
        r["ratio_to_folder"] = (r["img_per_s"] / ref["img_per_s"]) if ref and ref["img_per_s"] else None
        r["ratio_to_ffcv"] = (r["img_per_s"] / peer["img_per_s"]) if peer and peer["img_per_s"] else None
        r["cpu_ratio_to_folder"] = (ref["cpu_ms_per_img"] / r["cpu_ms_per_img"]
                                    if ref and r["cpu_ms_per_img"] else None)
    hw = hardware()
    if plot:
        plot_results(ok, b.aug, plot, f"{hw.get('cpus')} CPUs" + (f", {hw['gpu']}" if hw.get("gpu") else ""))
    return {"results": results, "aug": b.aug, "split": b.split, "batch_size": b.batch_size, "size": b.size,
            "batches": b.batches, "warmup": b.warmup, "min_seconds": b.min_seconds, "cold": b.cold,
            "dtype": dtype, "memory_format": memory_format, "peer": peer["loader"] if peer else None, "epochs_for_setup": EPOCHS_FOR_SETUP,
            "hardware": hw, "notes": notes}
