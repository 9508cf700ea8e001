"""`hamengine bench train`: steady-state img/s of the full training step (forward, backward,
optimizer) fed by the real loader, and fed by synthetic batches already on the device (the
no-data-loading ceiling). stall_ratio = img_per_s / synthetic_img_per_s (1.0 = the loader never
makes the step wait). warmup_s (first steps: torch.compile, allocator, cudnn autotune) is reported
apart and excluded from both rates."""
from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from hamengine.config import CompileMode, LoaderKind, Precision, TrainConfig


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
                    log=print) -> dict[str, Any]:
    """Measure with the engine's own TrainStep and loader wiring (see engine/trainer.py)."""
    from hamengine.engine.environment import hardware
    from hamengine.engine.prefetch import ThreadPrefetcher
    from hamengine.engine.train import TrainStep
    from hamengine.engine.trainer import PackSource, amp_dtype_for, build_optimizer, loader_config
    from hamengine.loaders.base import DTYPES
    from hamengine.models import create_model
    from hamengine.runtime import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    amp_dtype = amp_dtype_for(cfg, device)
    lcfg = loader_config(cfg, device, channels_last)
    model = create_model(cfg.model).to(device, memory_format=fmt)
    opt = build_optimizer(model, cfg)
    use_compile = cfg.compile == CompileMode.ON or (cfg.compile == CompileMode.AUTO and device.type == "cuda")
    compiled = torch.compile(model) if use_compile else model
    step = TrainStep(compiled, model, opt, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), device,
                     amp_dtype)

    # 1. Synthetic batches already on the device: the ceiling without any data loading.
    b, s = cfg.batch_size, cfg.size
    x = torch.randn(b, 3, s, s, device=device).to(DTYPES[Precision(lcfg.dtype)]).contiguous(memory_format=fmt)
    y = torch.randint(0, 7, (b,), device=device)
    synthetic = itertools.repeat((x, y))
    log(f"warm-up ({warmup} steps{', compiling' if use_compile else ''}) ...")
    warm_s, _, _ = _timed(step, synthetic, max(1, warmup), device)
    log(f"synthetic batches: {steps} steps ...")
    syn_s, _, syn_images = _timed(step, synthetic, steps, device)

    # 2. The real loader (train split: shuffled, augmented), through the same prefetch as training.
    t = time.perf_counter()
    loader = PackSource(cfg.pack).loader("train", lcfg, device, 0, 1)
    setup_s = time.perf_counter() - t
    use_prefetch = bool(prefetch)

    def epochs() -> Iterator:
        for e in itertools.count():
            loader.set_epoch(e)
            yield from loader

    source = iter(ThreadPrefetcher(epochs())) if use_prefetch else epochs()
    log(f"loader {loader.kind}: {warmup} warm-up + {steps} steps ...")
    _timed(step, source, max(1, warmup), device)
    real_s, data_s, real_images = _timed(step, source, steps, device)
    if hasattr(source, "close"):
        source.close()
    loader.close()

    img_per_s = real_images / real_s
    syn_per_s = syn_images / syn_s
    return {"model": cfg.model, "loader": loader.kind, "img_per_s": img_per_s,
            "synthetic_img_per_s": syn_per_s, "stall_ratio": img_per_s / syn_per_s, "warmup_s": warm_s,
            "hardware": hardware(), "device": str(device), "size": s, "batch_size": b,
            "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "channels_last": channels_last, "compile": use_compile and step.compile_failed is None,
            "compile_failed": step.compile_failed, "prefetch": use_prefetch, "steps": steps,
            "warmup_steps": warmup, "data_fraction": data_s / real_s, "loader_setup_s": setup_s}


@click.command()
@click.option("--pack", type=click.Path(), required=True, help="Pack folder to read the train split from.")
@click.option("--model", default="resnet50", show_default=True, help="Model name (see `hamengine models`).")
@click.option("--loader", type=click.Choice([k.value for k in LoaderKind]), default="auto", show_default=True,
              help="Loader kind.")
@click.option("--size", type=int, default=224, show_default=True, help="Input side in pixels.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Batch size.")
@click.option("--steps", type=int, default=30, show_default=True, help="Timed steps per measurement.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed warm-up steps (compile).")
@click.option("--amp-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Autocast dtype (fp32 = no autocast).")
@click.option("--compile", "compile_mode", type=click.Choice([m.value for m in CompileMode]), default="auto",
              show_default=True, help="torch.compile: auto = on with CUDA, off on CPU.")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Memory format [default: channels_last on CUDA, NCHW on CPU].")
@click.option("--prefetch/--no-prefetch", default=None, help="Background-thread prefetch, as `train --prefetch` [default: off].")
@click.option("--workers", type=int, default=0, show_default=True, help="Loader workers/threads (0 = all cores).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", type=click.Path(), default=None, help="Also write the JSON result to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_train(pack: str, model: str, loader: str, size: int, batch_size: int, steps: int, warmup: int,
                amp_dtype: str, compile_mode: str, channels_last: bool | None, prefetch: bool | None,
                workers: int, device: str, out: str | None, as_json: bool) -> None:
    """Training-step throughput with the real loader vs synthetic on-device batches (stall_ratio)."""
    from hamengine.commands.common import console, emit_json, fail

    cfg = TrainConfig(pack=pack, model=model, loader=LoaderKind(loader), size=size, batch_size=batch_size,
                      amp=amp_dtype != "fp32", amp_dtype=Precision(amp_dtype), compile=CompileMode(compile_mode),
                      channels_last=channels_last, workers=workers, device=device)
    try:
        res = run_bench_train(cfg, steps, warmup, prefetch,
                              log=(lambda m: None) if as_json else (lambda m: console.print(m, highlight=False)))
    except Exception as e:  # a pack / loader / device problem: one message
        if type(e).__name__ in ("PackError", "ConfigError", "PretrainedError", "ValueError", "RuntimeError"):
            fail(str(e))
        raise
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2) + "\n")
    if as_json:
        emit_json(res)
        return
    console.print(f"{res['model']} {res['size']}px batch {res['batch_size']} {res['amp_dtype']} "
                  f"{'channels_last' if res['channels_last'] else 'NCHW'} compile={res['compile']} "
                  f"loader={res['loader']} on {res['device']}")
    console.print(f"  real loader : {res['img_per_s']:8.1f} img/s (data wait {100 * res['data_fraction']:.0f}%)")
    console.print(f"  synthetic   : {res['synthetic_img_per_s']:8.1f} img/s")
    console.print(f"  stall_ratio : {res['stall_ratio']:.3f}   warm-up {res['warmup_s']:.1f} s")
