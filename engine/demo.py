"""`hamengine demo`: synth -> pack -> train hamnet on CPU (precision and memory format as measured on the
host: bf16 where the CPU runs it natively, fp32 where bf16 is emulated) -> test metrics, in minutes.

Sizes are chosen for 2 CPU cores: images are drawn at 200x150 (a third of HAM10000's 600x450;
the pack stores 144 px anyway, so drawing larger only costs time), packed at 144 px, trained at
128 with a class-balanced sampler (balanced accuracy is the metric) and a short cosine schedule."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from hamengine.config import DemoConfig, PackConfig, TrainConfig
from hamengine.engine.train.trainer import FitOptions, fit
from hamengine.loaders.ingest.synth import synthesize
from hamengine.loaders.pack.writer import pack_dataset


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    root = Path(cfg.workdir)
    t0 = time.perf_counter()
    console.print(f"[bold]1/3 synth[/] {cfg.n} images {cfg.image_size[0]}x{cfg.image_size[1]} -> {root / 'synth'}")
    synth = synthesize(root / "synth", n=cfg.n, seed=cfg.seed, size=cfg.image_size, progress=True)
    t1 = time.perf_counter()
    console.print(f"[bold]2/3 pack[/] {cfg.pack_size}px -> {root / 'pack'}")
    pack_dataset(PackConfig(source=str(synth), out=str(root / "pack"), size=cfg.pack_size, seed=cfg.seed),
                 progress=True)
    t2 = time.perf_counter()
    run = root / "runs" / time.strftime("hamnet-%Y%m%d-%H%M%S")
    console.print(f"[bold]3/3 train[/] {cfg.model} {cfg.epochs} epochs at {cfg.size}px -> {run}")
    tcfg = TrainConfig(pack=str((root / "pack").resolve()), model=cfg.model, epochs=cfg.epochs,
                       batch_size=cfg.batch_size, size=cfg.size, loader=cfg.loader, seed=cfg.seed,
                       out=str(run), device=cfg.device, warmup_epochs=1.0, lr=cfg.lr,
                       balance=cfg.balance)
    summary = fit(tcfg, FitOptions(console=console))
    t3 = time.perf_counter()
    return {"run": str(run), "train": summary,
            "seconds": {"synth": t1 - t0, "pack": t2 - t1, "train": t3 - t2, "total": t3 - t0}}
