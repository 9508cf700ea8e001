"""`hamengine bench loader`: images/s and per-batch latency of each loader kind, side by side.

Every loader reads the same pack split with the same augmentation preset, batch size and output
size; `folder` (the per-file PIL baseline over the original download) is the reference, and each
loader's ratio to it is measured in the same run. Set-up time (worker start, DALI build, the
resident cache's decode or load) is reported apart from the timed batches, which start after a
warm-up. On CUDA every batch is synchronized before its time is taken.
"""
from __future__ import annotations

import gc
import importlib.util
import shlex
import sys
import time
from typing import Any

import click
import numpy as np

from hamengine.commands.common import console, emit_json, err_console, fail

KINDS = ("folder", "torch", "dali", "resident", "ffcv")


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
                warmup: int) -> dict[str, Any]:
    """Build one loader, skip `warmup` batches, time the next `batches` (epochs wrap as needed)."""
    import torch

    from hamengine.config import LoaderConfig
    from hamengine.loaders import build_loader

    cfg = LoaderConfig(kind=kind, **cfg_kw)
    t0 = time.perf_counter()
    loader = build_loader(pack, split, cfg, device)
    setup_s = time.perf_counter() - t0
    cuda = loader.device.type == "cuda"
    cpu_s = 0.0
    lat: list[float] = []
    images = 0
    epoch = 0
    cpu0 = tree_cpu_seconds() if warmup == 0 else None
    try:
        while len(lat) < batches:
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
                    if warmup == 0:
                        cpu0 = tree_cpu_seconds()
                else:
                    lat.append(now - last)
                    images += int(x.shape[0])
                    if len(lat) >= batches:
                        cpu_s = tree_cpu_seconds() - (cpu0 or 0.0)
                        break
                last = time.perf_counter()
            if seen == 0:
                raise click.ClickException(f"loader {kind}: the {split} split yields no batches")
            epoch += 1
    finally:
        loader.close()
        del loader
        gc.collect()
    total = float(sum(lat))
    ms = np.asarray(lat) * 1000
    return {"loader": kind, "img_per_s": images / total if total else 0.0, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "batches": len(lat), "images": images,
            "setup_s": setup_s, "cpu_ms_per_img": 1000 * cpu_s / images if images else 0.0}


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


@click.command("loader")
@click.option("--pack", "pack", required=True, type=click.Path(exists=True, file_okay=False),
              help="Pack folder (from `hamengine pack`) every loader reads.")
@click.option("--source", type=click.Path(exists=True, file_okay=False), default=None,
              help="Original HAM10000 folder the pack was built from: the `folder` baseline reads it.")
@click.option("--loaders", default="folder,torch,dali,resident,ffcv", show_default=True,
              help="Comma-separated loader kinds to time, in this order. `folder` is the baseline (x folder "
                   "column); `ffcv` is the peer (x ffcv column): skipped with a note when FFCV is not "
                   "installed, exported from the pack on first use when it has no .beton yet.")
@click.option("--split", default="train", show_default=True,
              help="Pack split to read; `train` uses the augmentation preset, others the eval transform.")
@click.option("--aug", type=click.Choice(["full", "crop-flip", "none"]), default="full", show_default=True,
              help="Augmentation preset: full (random resized crop, rotation, flips, colour jitter), "
                   "crop-flip (random resized crop + flips: what FFCV does natively) or none.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1), help="Images per batch.")
@click.option("--size", default=224, show_default=True, type=click.IntRange(8), help="Output side S in pixels.")
@click.option("--batches", default=20, show_default=True, type=click.IntRange(1),
              help="Timed batches per loader, after the warm-up.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0),
              help="Batches read before timing starts (worker start-up, caches, allocator).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
              help="Worker processes / threads per loader; 0 = all cores.")
@click.option("--device", default="auto", show_default=True, help="Where batches go: auto, cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Output image dtype.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a bar plot of images/s (PNG) to this file.")
def bench_loader(pack: str, source: str | None, loaders: str, split: str, aug: str, batch_size: int, size: int,
                 batches: int, warmup: int, workers: int, device: str, dtype: str, as_json: bool,
                 plot: str | None) -> None:
    """Time each loader over the same pack, same images, same cores: images/s, p50/p99 batch latency,
    CPU per image, ratios to `folder` and to `ffcv`."""
    from hamengine.config import AugConfig, ConfigError
    from hamengine.engine.environment import hardware
    from hamengine.loaders.records import PackError

    kinds = [k.strip() for k in loaders.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        fail(f"--loaders: unknown kind(s) {', '.join(bad) or '(none)'}; choose from {', '.join(KINDS)}")
    if "folder" in kinds and not source:
        fail("--loaders includes folder: pass --source DIR (the HAM10000 folder the pack was built from)")
    cfg_kw = dict(size=size, batch_size=batch_size, aug=AugConfig(preset=aug), dtype=dtype, workers=workers,
                  source=source)
    if "ffcv" in kinds and importlib.util.find_spec("ffcv") is None:
        # Optional peer: time the others and say why ffcv is missing rather than failing the run.
        err_console.print("ffcv is not installed (pip install 'hamengine[ffcv]'); timing the other loaders")
        kinds.remove("ffcv")
    results: list[dict[str, Any]] = []
    for kind in kinds:
        if not as_json:
            console.print(f"[dim]timing {kind} ...[/]")
        try:
            results.append(time_loader(kind, pack, split, cfg_kw, device, batches, warmup))
        except (PackError, ConfigError, ValueError) as e:
            fail(f"loader {kind}: {e}")
    ref = next((r for r in results if r["loader"] == "folder"), None)
    peer = next((r for r in results if r["loader"] == "ffcv"), None)
    for r in results:
        r["ratio_to_folder"] = (r["img_per_s"] / ref["img_per_s"]) if ref and ref["img_per_s"] else None
        r["ratio_to_ffcv"] = (r["img_per_s"] / peer["img_per_s"]) if peer and peer["img_per_s"] else None
        r["cpu_ratio_to_folder"] = (ref["cpu_ms_per_img"] / r["cpu_ms_per_img"]
                                    if ref and r["cpu_ms_per_img"] else None)
    hw = hardware()
    out = {"results": results, "aug": aug, "split": split, "batch_size": batch_size, "size": size,
           "batches": batches, "warmup": warmup, "hardware": hw,
           "command": "hamengine " + shlex.join(sys.argv[1:])}
    if plot:
        plot_results(results, aug, plot, f"{hw.get('cpus')} CPUs" + (f", {hw['gpu']}" if hw.get("gpu") else ""))
    if as_json:
        emit_json(out)
        return
    from rich.table import Table

    t = Table(title=f"bench loader: --aug {aug}, batch {batch_size}, {size}px, {batches} batches")
    for col in ("loader", "img/s", "x folder", "x ffcv", "p50 ms", "p99 ms", "CPU ms/img", "x folder (CPU)", "setup s"):
        t.add_column(col, justify="right" if col != "loader" else "left")
    for r in results:
        ratio = f"{r['ratio_to_folder']:.2f}" if r["ratio_to_folder"] is not None else "-"
        cratio = f"{r['cpu_ratio_to_folder']:.2f}" if r["cpu_ratio_to_folder"] is not None else "-"
        fratio = f"{r['ratio_to_ffcv']:.2f}" if r["ratio_to_ffcv"] is not None else "-"
        t.add_row(r["loader"], f"{r['img_per_s']:.0f}", ratio, fratio, f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                  f"{r['cpu_ms_per_img']:.2f}", cratio, f"{r['setup_s']:.1f}")
    console.print(t)
    console.print(f"[dim]{hw.get('cpus')} CPUs, gpu: {hw.get('gpu')}, torch {hw.get('torch')}, "
                  f"dali {hw.get('dali')}, commit {hw.get('commit')}[/]")
