"""`fit(cfg)`: one training run from a resolved TrainConfig into its run directory.

Resume is exact at epoch boundaries: last.pt is written after every completed epoch (after its
validation) with model, optimizer, scheduler, scaler, EMA, every rank's RNG states and the epoch;
loaders are re-seeded by set_epoch(epoch), and the global RNGs restart from (seed, epoch, rank) at
each epoch's first batch (see the comment in the epoch loop). SIGINT/SIGTERM stop at the next step boundary and exit
cleanly WITHOUT saving the partial epoch: last.pt stays the last completed epoch, which `--resume`
continues bit-for-bit (deterministic settings) — at most one epoch of work is redone.
"""
from __future__ import annotations

import functools
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from hamengine.config import (
    CLASSES,
    Balance,
    CompileMode,
    ConfigError,
    LoaderConfig,
    MemoryFormat,
    Optimizer,
    Precision,
    Schedule,
    TrainConfig,
    to_dict,
)
from hamengine.engine import distributed as D
from hamengine.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from hamengine.engine.logger import LiveDisplay
from hamengine.engine.prefetch import ThreadPrefetcher
from hamengine.engine.run import RunDir
from hamengine.engine.train import EMA, TrainStep, evaluate, evaluate_checkpoint, train_one_epoch


class PackSource:
    """Batches from a pack through hamengine.loaders.build_loader (the loader contract)."""

    def __init__(self, pack: str | Path):
        from hamengine.loaders.records import Pack

        self.pack = Pack(pack)
        self.classes = tuple(self.pack.classes)

    def labels(self, split: str) -> np.ndarray:
        return self.pack.labels(split)

    def loader(self, split: str, cfg: LoaderConfig, device: torch.device, rank: int, world_size: int):
        from hamengine.loaders import build_loader

        return build_loader(self.pack, split, cfg, device, rank=rank, world_size=world_size)


def amp_dtype_for(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None = fp32. bf16 on CPU and GPUs that support it; fp16 on request (with GradScaler)."""
    if not cfg.amp or cfg.amp_dtype == Precision.FP32:
        return None
    if cfg.amp_dtype == Precision.FP16:
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16: using fp16 autocast with a GradScaler", stacklevel=2)
        return torch.float16
    return torch.bfloat16


def loader_config(cfg: TrainConfig, device: torch.device, channels_last: bool) -> LoaderConfig:
    dtype = {torch.bfloat16: Precision.BF16, torch.float16: Precision.FP16, None: Precision.FP32}[
        amp_dtype_for(cfg, device)]
    return LoaderConfig(kind=cfg.loader, size=cfg.size, batch_size=cfg.batch_size, aug=cfg.aug,
                        dtype=dtype, workers=cfg.workers, seed=cfg.seed,
                        memory_format=MemoryFormat.CHANNELS_LAST if channels_last else MemoryFormat.CONTIGUOUS,
                        balance_sampler=cfg.balance == Balance.SAMPLER)


def default_lr(cfg: TrainConfig) -> float:
    """SGD: linear scaling with batch size; AdamW: square-root scaling (Adam's normalized steps
    need less change with batch size). Fine-tuning pretrained weights uses a quarter."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.optimizer == Optimizer.SGD:
        base = 0.1 * cfg.batch_size / 256
    else:
        base = 2e-3 * math.sqrt(cfg.batch_size / 128)
    return base * (0.25 if (cfg.pretrained or cfg.pretrained_path) else 1.0)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-d tensors): decaying them only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    wd = cfg.weight_decay
    if wd is None:  # AdamW's decoupled decay wants ~0.05; SGD's L2-style decay ~1e-4
        wd = 0.05 if cfg.optimizer == Optimizer.ADAMW else 1e-4
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    lr = default_lr(cfg)
    if cfg.optimizer == Optimizer.SGD:
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int):
    """Per-step multiplier: linear warm-up over warmup_epochs, then cosine to 0 (or constant)."""
    warm = max(0, round(cfg.warmup_epochs * steps_per_epoch))
    total = max(1, cfg.epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == Schedule.CONSTANT:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


class StopRequest:
    """SIGINT/SIGTERM set a flag checked at step boundaries; a second signal aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


@dataclass
class FitOptions:
    """Run-time choices that are not part of the saved config."""

    deterministic: bool = False  # bit-exact CPU reruns/resumes (torch.use_deterministic_algorithms)
    prefetch: bool | None = None  # background-thread prefetch; None: off (loaders run ahead already)
    console: Console = field(default_factory=Console)
    source: Any = None  # a PackSource-like object; None: PackSource(cfg.pack)
    test_eval: bool = True


def _seed_all(seed: int) -> None:
    import random
    seed %= 2**63
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def fit(cfg: TrainConfig, opts: FitOptions | None = None) -> dict[str, Any]:
    """Train `cfg` into RunDir(cfg.out); returns a summary dict (run, epochs, best, test metrics)."""
    opts = opts or FitOptions()
    cfg.check()
    info, device = D.init_distributed(cfg.device)
    loaders: list[Any] = []
    try:
        return _fit(cfg, opts, info, device, loaders)
    finally:
        for loader in loaders:  # worker processes / pipelines
            getattr(loader, "close", lambda: None)()
        D.shutdown()


def _fit(cfg: TrainConfig, opts: FitOptions, info: D.DistInfo, device: torch.device,
         loaders: list[Any]) -> dict[str, Any]:
    from hamengine.engine.environment import hardware
    from hamengine.engine.plots_train import plot_curves
    from hamengine.models import create_model

    console = opts.console
    say = console.print if info.is_main else (lambda *a, **k: None)
    run = RunDir(cfg.out)
    if info.is_main:
        run.prepare(cfg)
    D.barrier(info)
    if opts.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels
    _seed_all(cfg.seed + info.rank)

    source = opts.source or PackSource(cfg.pack)
    # Before any epoch: with no val images no epoch can be scored, and no checkpoint chosen.
    for split, fix in (("train", "smaller --val / --test fractions"), ("val", "a larger --val fraction (e.g. 0.15)")):
        if len(source.labels(split)) == 0:
            raise ConfigError(f"{cfg.pack}: the {split} split is empty; re-pack with {fix}")
    classes = tuple(getattr(source, "classes", CLASSES))
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    amp_dtype = amp_dtype_for(cfg, device)
    lcfg = loader_config(cfg, device, channels_last)
    train_loader = source.loader("train", lcfg, device, info.rank, info.world_size)
    val_loader = source.loader("val", lcfg, device, info.rank, info.world_size)
    loaders += [train_loader, val_loader]
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has fewer samples than one batch ({cfg.batch_size} x "
                         f"{info.world_size} ranks): lower --batch-size")

    model = create_model(cfg.model, num_classes=len(classes), pretrained=cfg.pretrained,
                         pretrained_path=cfg.pretrained_path)
    model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ema = EMA(model, cfg.ema) if cfg.ema else None
    weight = class_weights(source.labels("train"), len(classes)).to(device) \
        if cfg.balance == Balance.LOSS else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

    start_epoch, best, best_epoch, since_best = 0, -1.0, 0, 0
    if cfg.resume:
        state = load_checkpoint(run.last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        rngs = state["rng"]
        set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
        start_epoch = int(state["epoch"])
        best, best_epoch = float(state["best"]["metric"]), int(state["best"]["epoch"])
        since_best = int(state["epochs_since_best"])
        say(f"resuming {run.path} after epoch {start_epoch}")
    if info.is_main:
        run.write_config(cfg)
        run.write_env({**hardware(), "device": str(device), "world_size": info.world_size,
                       "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                       "channels_last": channels_last, "deterministic": opts.deterministic,
                       # eval checks against it that a pack's test split holds no training images
                       "pack_fingerprint": getattr(getattr(source, "pack", None), "fingerprint", None)})
        rows = run.truncate_metrics(start_epoch) if cfg.resume else []
    else:
        rows = []

    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    use_compile = cfg.compile == CompileMode.ON or (cfg.compile == CompileMode.AUTO and device.type == "cuda")
    compiled = torch.compile(train_model) if use_compile else train_model
    step = TrainStep(compiled, train_model, optimizer, criterion, device, amp_dtype, scheduler, scaler,
                     cfg.grad_clip, ema)
    # A background thread can overlap batch assembly with compute for a loader that builds batches
    # in the calling thread. The shipped loaders already run ahead (resident and torch: worker
    # processes on CPU, async kernels on GPU; DALI: its pipeline queue), and on 2 cores the extra
    # thread only competed with the step (bench train), so it is opt-in. Never in deterministic
    # mode: a thread drawing from the global RNG concurrently with dropout makes the order racy.
    prefetch = bool(opts.prefetch) and not opts.deterministic

    say(f"[bold]train[/] {cfg.model} on {device} ({info.world_size} process(es)), "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.size}px, amp {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}, "
        f"{'channels_last' if channels_last else 'NCHW'}, compile {'on' if use_compile else 'off'}, "
        f"loader {getattr(train_loader, 'kind', cfg.loader)} -> {run.path}")
    interrupted = False
    epochs_done = start_epoch
    warmup_s = None
    with StopRequest() as stop, LiveDisplay(console, enabled=info.is_main) as display:
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.set_epoch(epoch)
            batches = ThreadPrefetcher(train_loader) if prefetch else train_loader
            first = epoch == start_epoch
            # The global RNGs (dropout, ...) restart from (seed, epoch, rank) once the epoch's first
            # batch is in hand: a loader may draw from them when its iterator starts (DataLoader's
            # base seed, once per process with persistent workers), which a resumed process does at a
            # different epoch than an uninterrupted one. Seeding after that draw makes resume exact.
            reseed = functools.partial(_seed_all, (cfg.seed + 1) * 1_000_003 + epoch * 1009 + info.rank)
            res = train_one_epoch(step, batches, steps_per_epoch, display, info, device, stop,
                                  description=f"epoch {epoch + 1}/{cfg.epochs}",
                                  warmup_steps=min(3, steps_per_epoch - 1) if first else 0,
                                  on_first_batch=reseed)
            if res.interrupted:
                interrupted = True
                break
            if first:
                warmup_s = res.timing["warmup_s"]
            eval_model = ema.module if ema is not None else unwrap(model)
            val_loader.set_epoch(0)
            val = evaluate(eval_model, val_loader, device, amp_dtype, info, classes)
            epochs_done = epoch + 1
            improved = val["balanced_accuracy"] > best
            if improved:
                best, best_epoch, since_best = val["balanced_accuracy"], epochs_done, 0
            else:
                since_best += 1
            row = {"epoch": epochs_done, "lr": optimizer.param_groups[0]["lr"], "train_loss": res.loss,
                   "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_auc": val["macro_auc"],
                   "val_n": val["n"],
                   "img_per_s": res.timing["img_per_s"], "data_ms": res.timing["data_ms"],
                   "step_ms": res.timing["step_ms"], "data_fraction": res.timing["data_fraction"],
                   "epoch_s": res.timing["wall_s"], "warmup_s": res.timing["warmup_s"] if first else 0.0,
                   "best": improved}
            rngs = D.gather_objects(rng_state(), info)  # every rank's RNG, for an exact resume
            if info.is_main:
                rows.append(row)
                run.append_metrics(row)  # before last.pt: a resume drops lines past the checkpoint
                meta = {"epoch": epochs_done, "config": to_dict(cfg), "classes": list(classes),
                        "model_name": cfg.model}
                if improved:
                    save_checkpoint({**meta, "model": eval_model.state_dict(), "metrics": row}, run.best)
                save_checkpoint({**meta, "model": unwrap(model).state_dict(),
                                 "ema": ema.state_dict() if ema else None,
                                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "scaler": scaler.state_dict() if scaler else None, "rng": rngs,
                                 "best": {"metric": best, "epoch": best_epoch},
                                 "epochs_since_best": since_best, "metrics": row}, run.last)
                plot_curves(rows, run.plots / "curves.png", title=f"{cfg.model} — {run.path.name}")
                display.log(
                    f"epoch {epochs_done:>3}/{cfg.epochs}  loss {res.loss:.3f}  val loss {val['loss']:.3f}  "
                    f"acc {val['accuracy']:.3f}  bal acc {val['balanced_accuracy']:.3f}  "
                    f"auc {_fmt(val['macro_auc'])}  {res.timing['img_per_s']:.0f} img/s  "
                    f"data {res.timing['data_ms']:.0f} ms / step {res.timing['step_ms']:.0f} ms"
                    f"{'  *best*' if improved else ''}")
            D.barrier(info)
            if cfg.early_stop and since_best >= cfg.early_stop:
                say(f"early stop: no balanced-accuracy gain for {since_best} epochs")
                break
        stop_signal = stop.signum

    summary: dict[str, Any] = {"run": str(run.path), "epochs": epochs_done, "best_epoch": best_epoch,
                               "best_val_balanced_accuracy": best if best >= 0 else None,
                               "interrupted": interrupted, "warmup_s": warmup_s,
                               "compile_failed": step.compile_failed}
    if interrupted:
        if run.last.exists():
            say(f"[yellow]interrupted[/] (signal {stop_signal}): {run.last} holds epoch {epochs_done}; "
                f"continue with --resume --out {run.path}")
        else:  # stopped inside the first epoch: nothing to resume from
            say(f"[yellow]interrupted[/] (signal {stop_signal}) before the first epoch ended: no checkpoint "
                f"was written; run the same command again (without --resume) to start over")
        return summary
    if info.is_main and opts.test_eval and run.best.exists():
        t = time.perf_counter()
        test = evaluate_checkpoint(run.path, "test", "best", device)
        summary["test"] = {k: test[k] for k in ("balanced_accuracy", "accuracy", "macro_auc", "n")}
        summary["test"]["per_class_recall"] = {k: v["recall"] for k, v in test["per_class"].items()}
        summary["test_eval_s"] = time.perf_counter() - t
    D.barrier(info)
    return summary


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
