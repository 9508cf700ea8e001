"""`hamengine bench pack`: images/s and peak memory of `hamengine pack` per worker count.

Each configuration runs in a fresh child process (so peak RSS is its own, not a previous run's):
the child packs into a temporary folder and reports its time, CPU seconds and `ru_maxrss` for itself
and for its pool workers (RUSAGE_CHILDREN, reaped before it exits). The parent also samples the whole process
tree's summed RSS every 50 ms: that is the number to hold against a memory budget.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hamengine.bench import BenchError
from hamengine.config import PackConfig
from hamengine.engine.runtime.environment import hardware
from hamengine.errors import ConfigError
from hamengine.loaders.pack.writer import pack_dataset
from hamengine.runtime import cpu_count

_CHILD = "from hamengine.bench.pack import _child; _child()"


def _child() -> None:
    """Child entry: pack per the JSON config in argv[1]; print timing and ru_maxrss as JSON."""

    cfg = PackConfig(**json.loads(sys.argv[1]))
    start = time.perf_counter()
    manifest = pack_dataset(cfg, progress=False)
    seconds = time.perf_counter() - start
    images = sum(s["samples"] for s in manifest["shards"])
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"seconds": seconds, "images": images, "bytes": manifest["stats"]["total_bytes"],
                      "rss_self_kb": me.ru_maxrss, "rss_workers_kb": kids.ru_maxrss,
                      "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}))


def _tree_rss_kb(pid: int) -> int:
    """Summed VmRSS of pid and all its descendants (Linux /proc); 0 where unreadable."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def run_config(source: Path, out: Path, workers: int, size: int, quality: int) -> dict[str, Any]:
    cfg = {"source": str(source), "out": str(out), "size": size, "quality": quality, "workers": workers,
           "force": True}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, _tree_rss_kb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out_text, err_text = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"pack with {workers} worker(s) failed:\n{err_text.strip()[-2000:]}")
    r = json.loads(out_text.strip().splitlines()[-1])
    return {"workers": workers, "images": r["images"], "seconds": round(r["seconds"], 2),
            "images_per_s": round(r["images"] / r["seconds"], 1), "wall_s": round(wall, 2),
            "peak_rss_mb": round(max(r["rss_self_kb"], r["rss_workers_kb"]) / 1024, 1),
            "peak_tree_rss_mb": round(peak / 1024, 1), "pack_mb": round(r["bytes"] / 1e6, 1),
            # CPU seconds of the pack and its workers (incl. imports): robust to other load on the host
            "cpu_s": round(r["cpu_s"], 1),
            # Other work on the host caps the wall-clock numbers (and a busy host hides the speedup:
            # Linux shares CPU per session, not per process); cpu_s / wall_s shows what this run got.
            "cpu_per_wall": round(r["cpu_s"] / wall, 2),
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_bench_pack(source: Path, worker_counts: list[int], size: int = 256, quality: int = 90,
                   tmp_dir: Path | None = None, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Pack `source` once per worker count (0 = all cores) into a temporary folder, removed
    afterwards; returns {"results": [...] with speedup over the first count, hardware, ...}."""

    if not worker_counts or min(worker_counts) < 0:
        raise ConfigError(f"--workers {','.join(map(str, worker_counts)) or '(none)'}: give worker counts >= 0 "
                          f"(0 = all cores), e.g. 1,0")
    counts = [w or cpu_count() for w in worker_counts]
    results = []
    with tempfile.TemporaryDirectory(prefix="hamengine-bench-pack-", dir=tmp_dir) as tmp:
        for w in counts:
            log(f"packing with {w} worker(s) ...")
            results.append(run_config(source, Path(tmp) / f"w{w}", w, size, quality))
    base = results[0]["images_per_s"]
    for r in results:
        r["speedup"] = round(r["images_per_s"] / base, 2)
    return {"bench": "pack", "source_images": results[0]["images"], "size": size, "quality": quality,
            "results": results, "hardware": hardware()}
