"""`hamengine bench pack | loader | train | serve`: parse options, call hamengine.bench, print the
result (a table, or JSON with --json). The measuring lives in bench/; results carry the hardware,
versions and commit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from hamengine.commands.bench_tta import bench_tta
from hamengine.commands.common import (
    command_line,
    config_options,
    console,
    emit_json,
    err_console,
    int_list,
    say,
)
from hamengine.config import AugPreset, Precision, TrainConfig, from_dict


@click.group()
def bench() -> None:
    """Measure packing, loading, training and serving throughput. Results carry the hardware,
    versions and commit; quote ratios measured in the same run (see BENCHMARKS.md)."""


def _write(path: Path | str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------- pack

@bench.command("pack")
@click.option("--source", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="HAM10000 folder to pack (e.g. `hamengine synth --out DIR` for the 10,015-image set).")
@click.option("--workers", "workers_list", default="1,0", show_default=True,
              help="Comma-separated worker counts to compare; 0 = all cores.")
@click.option("--size", default=256, show_default=True, type=int, help="Shorter side of packed images.")
@click.option("--quality", default=90, show_default=True, type=int, help="JPEG quality of packed images.")
@click.option("--tmp", "tmp_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the temporary packs go (default: the system temp folder); removed afterwards.")
@click.option("--out", "result_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results JSON to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def bench_pack(source: Path, workers_list: str, size: int, quality: int, tmp_dir: Path | None,
               result_file: Path | None, as_json: bool) -> None:
    """Pack SOURCE with each worker count; report images/s, peak RSS and the speedup over the first."""
    from hamengine.bench.pack import run_bench_pack  # lazy: torch (--help stays fast)

    report = run_bench_pack(source, int_list("--workers", workers_list), size, quality, tmp_dir,
                            log=say(as_json))
    report["command"] = command_line()
    _write(result_file, report)
    if as_json:
        emit_json(report)
        return

    results = report["results"]
    t = Table(title=f"hamengine pack, {results[0]['images']} images -> shorter side {size}")
    for col in ("workers", "seconds", "images/s", "speedup", "peak RSS (MB, max process)",
                "peak RSS (MB, tree sum)"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r["workers"]), f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}", f"{r['speedup']:.2f}x",
                  f"{r['peak_rss_mb']:.0f}", f"{r['peak_tree_rss_mb']:.0f}")
    console.print(t)
    console.print(f"hardware: {report['hardware']['cpu']}, {report['hardware']['cpus']} cpus", highlight=False)


# ---------------------------------------------------------------- loader

@bench.command("loader")
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
@click.option("--aug", type=click.Choice([a.value for a in AugPreset]), default="full", show_default=True,
              help="Augmentation preset: full (random resized crop, rotation, flips, colour jitter), "
                   "crop-flip (random resized crop + flips: what FFCV does natively) or none.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1), help="Images per batch.")
@click.option("--size", default=224, show_default=True, type=click.IntRange(8), help="Output side S in pixels.")
@click.option("--batches", default=20, show_default=True, type=click.IntRange(1),
              help="Timed batches per loader, after the warm-up.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0),
              help="Batches read before timing starts (worker start-up, caches, allocator).")
@click.option("--min-seconds", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Keep timing batches past --batches until they add up to this many seconds (fast "
                   "loaders on a GPU: 2 s measures 20,000+ img/s instead of guessing it).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
              help="Worker processes / threads per loader; 0 = all cores.")
@click.option("--device", default="auto", show_default=True, help="Where batches go: auto, cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice([p.value for p in Precision]), default="auto", show_default=True,
              help="Output image dtype: auto = what `train` feeds hamnet at this side and batch on this host "
                   "(its measured plan: fp32 on a CPU without native bf16, bf16 where bf16 is faster; bf16 on "
                   "CUDA); or force one.")
@click.option("--cold", is_flag=True,
              help="Pay every one-time cost in this run, as a first-time user does: the resident cache is "
                   "decoded into a fresh temporary folder (the pack's cache is left alone) and the FFCV "
                   "export is rewritten (same bytes). Without it, existing caches and exports are reused.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a bar plot of images/s (PNG) to this file.")
def bench_loader(pack: str, source: str | None, loaders: str, split: str, aug: str, batch_size: int, size: int,
                 batches: int, warmup: int, min_seconds: float, workers: int, device: str, dtype: str,
                 cold: bool, as_json: bool, plot: str | None) -> None:
    """Time each loader over the same pack, same images, same cores: images/s, p50/p99 batch latency,
    CPU per image, ratios to `folder` and to `ffcv`."""
    from hamengine.bench.loader import (  # lazy: torch (--help stays fast)
        LoaderBench,
        run_bench_loader,
    )

    kinds = [k.strip() for k in loaders.split(",") if k.strip()]
    out = run_bench_loader(LoaderBench(pack=pack, kinds=kinds, source=source, split=split, aug=aug,
                                       batch_size=batch_size, size=size, batches=batches, warmup=warmup,
                                       min_seconds=min_seconds, workers=workers, device=device, dtype=dtype,
                                       cold=cold),
                           plot=plot, log=say(as_json))
    for note in out["notes"]:
        err_console.print(note, highlight=False)
    out["command"] = command_line()
    if as_json:
        emit_json(out)
        return

    hw = out["hardware"]
    t = Table(title=f"bench loader: --aug {aug}, batch {batch_size}, {size}px, {batches} batches")
    cols = ("loader", "img/s", "x folder", "x ffcv", "p50 ms", "p99 ms", "CPU ms/img", "x folder (CPU)",
            "set-up s" + (" (cold)" if cold else ""), f"img/s over {out['epochs_for_setup']} epochs")
    for col in cols:
        t.add_column(col, justify="right" if col != "loader" else "left")

    def ratio(v: float | None) -> str:
        return f"{v:.2f}" if v is not None else "-"

    for r in out["results"]:
        if r.get("error"):  # this kind failed; the others were still timed
            t.add_row(r["loader"], "failed", *["-"] * (len(cols) - 2))
            continue
        name = r["loader"] + (f" ({r['kernel']})" if r.get("kernel") not in (None, "none") else "")
        t.add_row(name, f"{r['img_per_s']:.0f}", ratio(r["ratio_to_folder"]), ratio(r["ratio_to_ffcv"]),
                  f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['cpu_ms_per_img']:.2f}",
                  ratio(r["cpu_ratio_to_folder"]), f"{r['setup_total_s']:.1f}", f"{r['img_per_s_30_epochs']:.0f}")
    console.print(t)
    for r in out["results"]:
        if r.get("error"):
            err_console.print(f"loader {r['loader']} failed: {r['error']}", highlight=False)
    console.print(f"[dim]{hw.get('cpus')} CPUs, gpu: {hw.get('gpu')}, torch {hw.get('torch')}, "
                  f"dali {hw.get('dali')}, commit {hw.get('commit')}[/]")


# ---------------------------------------------------------------- train

# The training options `bench train` times: declared once, on TrainConfig (as `train` shows them).
BENCH_TRAIN_FIELDS = ("model", "loader", "size", "batch_size", "amp_dtype", "channels_last", "compile", "workers",
                      "device")

@bench.command("train")
@click.option("--pack", type=click.Path(), required=True, help="Pack folder to read the train split from.")
@config_options(TrainConfig, only=BENCH_TRAIN_FIELDS)
@click.option("--steps", type=click.IntRange(1), default=30, show_default=True, help="Timed steps per measurement.")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True,
              help="Untimed warm-up steps (compile).")
@click.option("--prefetch/--no-prefetch", default=None,
              help="Background-thread prefetch, as `train --prefetch` [default: off].")
@click.option("--out", type=click.Path(), default=None, help="Also write the JSON result to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_train(pack: str, steps: int, warmup: int, prefetch: bool | None, out: str | None, as_json: bool,
                **train_options: Any) -> None:
    """Training-step throughput with the real loader vs synthetic on-device batches (stall_ratio)."""
    from hamengine.bench.train import run_bench_train  # lazy: torch (--help stays fast)

    cfg = from_dict(TrainConfig, {"pack": pack, **train_options}, where="options")
    res = run_bench_train(cfg, steps, warmup, prefetch, log=say(as_json))
    _write(out, res)
    if as_json:
        emit_json(res)
        return
    console.print(f"{res['model']} {res['size']}px batch {res['batch_size']} {res['amp_dtype']} "
                  f"{'channels_last' if res['channels_last'] else 'NCHW'} compile={res['compile']} "
                  f"loader={res['loader']} on {res['device']}")
    for line in res.get("plan_lines", []):
        console.print(f"  [dim]{line}[/]")
    if res.get("error"):  # the loader failed; the synthetic ceiling was still measured
        console.print(f"  real loader : failed: {res['error']}", highlight=False)
    else:
        console.print(f"  real loader : {res['img_per_s']:8.1f} img/s (data wait {100 * res['data_fraction']:.0f}%)")
    console.print(f"  synthetic   : {res['synthetic_img_per_s']:8.1f} img/s")
    if not res.get("error"):
        console.print(f"  stall_ratio : {res['stall_ratio']:.3f}   warm-up {res['warmup_s']:.1f} s")


# ---------------------------------------------------------------- serve

@bench.command("serve")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--requests", "n_requests", default=200, show_default=True, type=click.IntRange(1, 100_000),
              help="Requests sent at each concurrency level (after a short warm-up).")
@click.option("--concurrency", default="1,8", show_default=True,
              help="Comma-separated numbers of concurrent clients, one measurement each.")
@click.option("--image", "image_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image to send (default: a synthetic 600x450 JPEG, HAM10000's size).")
@click.option("--device", default="auto", show_default=True, help="Server inference device.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Server micro-batch size (1: no batching), passed to `hamengine serve`.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0),
              help="Requests sent before measuring (model warm-up, connection setup).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with hardware).")
def bench_serve(run: Path, n_requests: int, concurrency: str, image_path: Path | None, device: str,
                max_batch: int, warmup: int, as_json: bool) -> None:
    """Requests/s and client latency p50/p99 of POST /api/predict against `hamengine serve RUN`
    started on a free loopback port (never exposed), at each concurrency level."""
    from hamengine.bench.serve import (  # lazy: torch (--help stays fast)
        run_bench_serve,
        synthetic_jpeg,
    )

    levels = int_list("--concurrency", concurrency)
    image = image_path.read_bytes() if image_path else synthetic_jpeg()
    report = run_bench_serve(run, image, levels, n_requests, device, max_batch, warmup, log=say(as_json))
    report.update(image=str(image_path) if image_path else "synthetic 600x450 JPEG", command=command_line())
    if as_json:
        emit_json(report)
        return

    table = Table(title=f"bench serve: {report['model']} on {report['device']} (max batch {max_batch})")
    for col in ("concurrency", "req/s", "p50 ms", "p99 ms", "mean batch", "errors"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(str(r["concurrency"]), str(r["req_per_s"]), str(r["p50_ms"]), str(r["p99_ms"]),
                      str(r["mean_batch"]), str(r["errors"]))
    console.print(table)


bench.add_command(bench_tta, "tta")
