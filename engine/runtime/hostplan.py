"""What this host runs fastest, measured: the probe behind `resolve_execution`'s `auto` choices on CPU.

A CPU without native bf16 (AVX2-only x86: many cloud VMs, AMD Zen 2/3, most client chips) emulates
bf16 autocast 13-27x slower than fp32, while one with AVX-512 BF16 or AMX runs it about 2x faster.
Nothing short of timing tells the two apart reliably (flags lie under VMs and ISA caps), so `auto`
times a few training steps of the run's own model, side and batch for each candidate and keeps the
fastest. The table is cached per host (CPU model, its flags, torch's ISA level, torch version) and
per model/side/batch in the user's cache folder, so only the first run of a shape pays for it.

A probe step is forward + backward + zero_grad on a private copy of the model with random inputs
(no optimizer step: the run's weights, BatchNorm statistics and RNG-driven loaders are untouched).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hamengine.config import Precision
from hamengine.fileio import atomic_write_text
from hamengine.models import create_model

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CACHE_FILE = "host-plan.json"
CACHE_VERSION = 1
SCREEN_BATCH = 8  # every candidate runs one warm-up and one step at this batch first
SCREEN_OUT = 2.0  # ... and is timed at the full batch only when within this factor of the best screened
WARMUP, TIMED = 1, 3  # full-batch steps per surviving candidate: untimed, then timed (median)


@dataclass(frozen=True)
class Candidate:
    """One way to run the step: autocast precision and memory format."""

    precision: Precision  # FP32 (no autocast) or BF16
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{self.precision.value}/{'channels_last' if self.channels_last else 'NCHW'}"


# name -> training img/s (forward + backward) at the probe's model, side and batch
ProbeTable = dict[str, float]
Probe = Callable[[str, int, int, Sequence[Candidate]], ProbeTable]


@cache
def cpu_info() -> dict[str, Any]:
    """CPU model, the flags that decide bf16 speed, and torch's ISA level (env.json, cache key).
    Read once per process: every plan (and the cache key of each) asks for it. Callers must not
    mutate the returned dict."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if flags and model:
                break
    except OSError:  # not Linux: the model from platform, no flags
        pass
    return {"cpu_model": model, "cpu_flags": {f: f in flags for f in CPU_FLAGS},
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            # the ISA caps a user (or our emulation of an AVX2 host) may set: they change what runs fast
            "isa_env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}}


def native_bf16(info: dict[str, Any]) -> bool:
    """Whether the CPU reports bf16 instructions that torch can use (a hint for messages only:
    the decision is the measurement)."""
    flags = info["cpu_flags"]
    return (flags.get("avx512_bf16") or flags.get("amx_bf16")) and info["cpu_capability"] != "AVX2"


def cache_dir() -> Path:
    """HAMENGINE_CACHE_DIR, else $XDG_CACHE_HOME/hamengine, else ~/.cache/hamengine."""
    if os.environ.get("HAMENGINE_CACHE_DIR"):
        return Path(os.environ["HAMENGINE_CACHE_DIR"])
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home directory (a bare container user): a folder of the temp dir
        import tempfile

        base = Path(tempfile.gettempdir())
    return Path(base) / "hamengine"


def cache_key(model: str, size: int, batch: int) -> str:
    host = cpu_info()
    # threads and usable cores too: torchrun's OMP_NUM_THREADS=1 ranks, or a CPU quota, run at another speed
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [CACHE_VERSION, host["cpu_model"], sorted(k for k, v in host["cpu_flags"].items() if v),
             host["cpu_capability"], host["isa_env"], torch.__version__, torch.get_num_threads(), cores,
             model, size, batch]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent or damaged: measure again (and rewrite it whole)
        return {}


def _cached_rates(entry: Any) -> dict[str, float]:
    if not isinstance(entry, dict) or not isinstance(entry.get("img_per_s"), dict):
        return {}
    return {k: float(v) for k, v in entry["img_per_s"].items() if isinstance(v, (int, float))}


def probe_table(model: str, size: int, batch: int, candidates: Sequence[Candidate],
                probe: Probe | None = None) -> tuple[ProbeTable, bool]:
    """img/s per candidate, and whether all of it came from the cache. Only candidates the cache
    lacks for this host and shape are measured (training's four and inference's two fp32 ones share
    an entry). `probe` (tests: a stub) replaces the measurement; its results are cached like the real one's."""
    path = cache_dir() / CACHE_FILE
    key = cache_key(model, size, batch)
    known = _cached_rates(_read_cache(path).get(key))
    missing = [c for c in candidates if c.name not in known]
    if missing:
        # the rates already known screen the new candidates too (an emulated bf16 is not timed in full
        # because fp32 was measured by an earlier, inference-only run)
        known.update((probe or partial(measure, reference=max(known.values(), default=0.0)))(
            model, size, batch, missing))
        data = _read_cache(path)  # re-read: another run may have added its own shape meanwhile
        data[key] = {"model": model, "size": size, "batch": batch, "torch": torch.__version__,
                     "cpu": cpu_info()["cpu_model"], "img_per_s": {**_cached_rates(data.get(key)), **known},
                     "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError:  # a read-only home: the plan still holds for this run, it is measured again next time
            pass
    return {c.name: known[c.name] for c in candidates}, not missing


def measure(model_name: str, size: int, batch: int, candidates: Sequence[Candidate],
            num_classes: int = 7, reference: float = 0.0) -> ProbeTable:
    """Training img/s of each candidate on the CPU. Every candidate first runs a warm-up and one
    step at batch SCREEN_BATCH; only those within SCREEN_OUT of the best screened rate are timed at
    the full batch (an emulated-bf16 resnet18 step at batch 32 takes ~40 s: it is screened out on a
    step a quarter of that). A screened-out candidate's entry is its screened rate. `reference`: the
    best rate already known for this shape (cached candidates), which screens too."""

    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is untouched (a run's seed stream)
        torch.manual_seed(0)
        base = create_model(model_name, num_classes=num_classes)
        return _measure(base, size, batch, candidates, reference)


def _measure(base: nn.Module, size: int, batch: int, candidates: Sequence[Candidate], reference: float) -> ProbeTable:
    screened = {c.name: _rate(base, c, size, min(batch, SCREEN_BATCH), warmup=1, timed=1) for c in candidates}
    # a cached full-batch rate screens at twice the distance: per image, batch 8 runs slower than full batches
    best = max(max(screened.values()), reference / SCREEN_OUT)
    table = dict(screened)
    for c in candidates:
        if screened[c.name] * SCREEN_OUT >= best and batch > SCREEN_BATCH:
            table[c.name] = _rate(base, c, size, batch, warmup=WARMUP, timed=TIMED)
    return table


def _rate(base: nn.Module, c: Candidate, size: int, batch: int, warmup: int, timed: int) -> float:
    fmt = torch.channels_last if c.channels_last else torch.contiguous_format
    model = copy.deepcopy(base).to(memory_format=fmt).train()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.zeros(batch, dtype=torch.long)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.precision == Precision.BF16):
            loss = criterion(model(x).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch / sorted(times)[len(times) // 2]
