"""`hamengine bench train`: steady-state img/s of the full training step (forward, backward,
optimizer) fed by the real loader, and fed by synthetic batches already on the device (the
no-data-loading ceiling). stall_ratio = img_per_s / synthetic_img_per_s (1.0 = the loader never
makes the step wait). warmup_s (first steps: torch.compile, allocator, cudnn autotune) is reported
apart and excluded from both rates."""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from hamengine.config import LoaderKind, TrainConfig
from hamengine.engine.runtime.environment import hardware
from hamengine.engine.runtime.execution import RunShape, configure_backends, resolve_execution
from hamengine.engine.train.data import PackSource
from hamengine.engine.train.optim import build_optimizer
from hamengine.engine.train.prefetch import ThreadPrefetcher
from hamengine.engine.train.step import TrainStep
from hamengine.loaders.kinds.base import DTYPES
from hamengine.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, batches: Iterator, n: int, device: torch.device) -> tuple[float, float, int]:
    """(wall seconds, seconds waiting for data, images) over n steps; synchronized at both ends."""
    _sync(device)
    start = time.perf_counter()
    data_s = 0.0
    images = 0
    for _ in range(n):
        t = time.perf_counter()
        x, y = next(batches)
        data_s += time.perf_counter() - t
        step(x, y)
        images += x.shape[0]
    _sync(device)
    return time.perf_counter() - start, data_s, images


def run_bench_train(cfg: TrainConfig, steps: int = 30, warmup: int = 5, prefetch: bool | None = None,
                    log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Measure with the engine's own TrainStep, execution choices and loader wiring (engine/train/trainer.py)."""

    cfg.check()
    ex = resolve_execution(cfg, shape=RunShape(images=(steps + warmup) * 2 * cfg.batch_size))
    device = ex.device
    configure_backends(device)
    torch.manual_seed(cfg.seed)
    lcfg = ex.loader_config(cfg)
    notes: list[str] = []
    if lcfg.balance_sampler and lcfg.kind == LoaderKind.DALI:
        # The default --balance sampler is refused by DALI's reader (no weighted sampler). A
        # throughput bench does not depend on which samples are drawn: time DALI unweighted, say so.
        lcfg = dataclasses.replace(lcfg, balance_sampler=False)
        notes.append("dali: class-balanced sampling is off (its reader cannot weight samples)")
    model = ex.place(create_model(cfg.model))
    opt = build_optimizer(model, cfg)
    compiled = torch.compile(model) if ex.compile else model
    scaler = torch.amp.GradScaler(device.type) if ex.amp_dtype == torch.float16 else None
    step = TrainStep(compiled, model, opt, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), device,
                     ex.amp_dtype, scaler=scaler)

    # 1. Synthetic batches already on the device: the ceiling without any data loading.
    b, s = cfg.batch_size, cfg.size
    x = torch.randn(b, 3, s, s, device=device).to(DTYPES[lcfg.dtype]).contiguous(memory_format=ex.memory_format)
    y = torch.randint(0, 7, (b,), device=device)
    synthetic = itertools.repeat((x, y))
    log(f"warm-up ({warmup} steps{', compiling' if ex.compile else ''}) ...")
    warm_s, _, _ = _timed(step, synthetic, max(1, warmup), device)
    log(f"synthetic batches: {steps} steps ...")
    syn_s, _, syn_images = _timed(step, synthetic, steps, device)

    # 2. The real loader (train split: shuffled, augmented), through the same prefetch as training.
    # A loader that fails (build or a batch) is recorded with its error: the synthetic ceiling
    # measured above is still reported rather than lost.
    use_prefetch = bool(prefetch)
    syn_per_s = syn_images / syn_s
    res = {"model": cfg.model, "loader": getattr(lcfg.kind, "value", lcfg.kind), "img_per_s": None,
           "synthetic_img_per_s": syn_per_s, "stall_ratio": None, "warmup_s": warm_s, "hardware": hardware(), "device": str(device), "size": s,
           "batch_size": b, "amp_dtype": ex.amp_name, "channels_last": ex.channels_last,
           "plan": ex.plan.record(), "plan_lines": ex.explain(),
           "compile": ex.compile and step.compile_failed is None, "compile_failed": step.compile_failed,
           "prefetch": use_prefetch, "steps": steps, "warmup_steps": warmup, "data_fraction": None,
           "loader_setup_s": None, "error": None, "notes": notes}
    try:
        real_s, data_s, real_images, kind, setup_s = _time_loader(cfg, lcfg, step, device, steps, warmup,
                                                                  use_prefetch, log)
    except Exception as e:  # noqa: BLE001 -- see above
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"loader {lcfg.kind}: failed: {res['error']}")
        return res
    img_per_s = real_images / real_s
    res.update(loader=kind, img_per_s=img_per_s, stall_ratio=img_per_s / syn_per_s,
               data_fraction=data_s / real_s, loader_setup_s=setup_s)
    return res


def _time_loader(cfg: TrainConfig, lcfg, step, device: torch.device, steps: int, warmup: int, prefetch: bool,
                 log: Callable[[str], None]) -> tuple[float, float, int, str, float]:
    """(wall s, data-wait s, images, loader kind, set-up s) of the real loader feeding `step`."""

    t = time.perf_counter()
    loader = PackSource(cfg.pack).loader("train", lcfg, device, 0, 1)
    setup_s = time.perf_counter() - t

    def epochs() -> Iterator:
        for e in itertools.count():
            loader.set_epoch(e)
            yield from loader

    source = iter(ThreadPrefetcher(epochs())) if prefetch else epochs()
    log(f"loader {loader.kind}: {warmup} warm-up + {steps} steps ...")
    try:
        _timed(step, source, max(1, warmup), device)
        real_s, data_s, real_images = _timed(step, source, steps, device)
    finally:
        if hasattr(source, "close"):
            source.close()
        loader.close()
    return real_s, data_s, real_images, loader.kind, setup_s
