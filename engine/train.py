"""The training step, one training epoch, evaluation, and the end-of-training test evaluation.

`fit` (engine/trainer.py) wires these together; `bench train` reuses `TrainStep` so the benchmark
times exactly the step that training runs.
"""
from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hamengine.config import CLASSES
from hamengine.engine.checkpoint import unwrap
from hamengine.engine.distributed import DistInfo, all_reduce_sum, any_rank, gather_arrays
from hamengine.engine.logger import EpochMeter, LiveDisplay


class EMA:
    """Exponential moving average of the weights (buffers copied). Decay ramps up as
    min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random init."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = unwrap(model)
        ema_p = [p for p in self.module.parameters()]
        torch._foreach_lerp_(ema_p, [p.detach() for p in src.parameters()], 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), src.buffers(), strict=False):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on `device`, or nothing (fp32) when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class TrainStep:
    """forward (autocast) -> loss -> backward (GradScaler for fp16) -> clip -> optimizer -> scheduler
    -> EMA. With a compiled model, the first call compiles; a compile failure falls back to the
    eager model with one warning and the step is redone eagerly."""

    def __init__(self, model: nn.Module, eager: nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                 scheduler: Any = None, scaler: torch.amp.GradScaler | None = None,
                 grad_clip: float | None = None, ema: EMA | None = None):
        self.model, self.eager = model, eager
        self.compiled = model is not eager
        self.optimizer, self.criterion, self.device = optimizer, criterion, device
        self.amp_dtype, self.scheduler, self.scaler = amp_dtype, scheduler, scaler
        self.grad_clip, self.ema = grad_clip, ema
        self.calls = 0
        self.compile_failed: str | None = None

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(images)  # N x C
        loss = self.criterion(logits.float(), labels)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.compiled and self.calls == 1:
            try:
                return self._step(images, labels)
            except Exception as e:  # torch._dynamo / inductor errors have many types
                self.compile_failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                warnings.warn(f"torch.compile failed ({self.compile_failed}); training eagerly", stacklevel=2)
                self.model, self.compiled = self.eager, False
        return self._step(images, labels)


@dataclass
class EpochResult:
    loss: float
    steps: int
    interrupted: bool
    timing: dict[str, float]


def train_one_epoch(step: TrainStep, batches: Iterable, total_steps: int, display: LiveDisplay,
                    info: DistInfo, device: torch.device, should_stop: Callable[[], bool],
                    description: str = "train", warmup_steps: int = 0, sync_every: int = 20,
                    on_first_batch: Callable[[], None] | None = None) -> EpochResult:
    """Run at most `total_steps` steps over `batches`. Stops early (interrupted=True) at a step
    boundary when `should_stop()` turns true on any rank. `on_first_batch` runs once the first
    batch is in hand, before the first step (the trainer re-seeds the global RNGs there)."""
    step.model.train()
    meter = EpochMeter(warmup_steps=warmup_steps)
    display.start_epoch(description, total_steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no per-step sync
    n = 0
    interrupted = False
    last_loss: float | None = None
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    it = iter(batches)
    while True:
        try:
            images, labels = next(it)
        except StopIteration:
            break
        except Exception:
            # Ctrl-C reaches the whole process group: loader workers may die before this process
            # reaches its step boundary. With a stop requested that is the interruption, not an error.
            if should_stop():
                interrupted = True
                break
            raise
        t1 = time.perf_counter()
        if n == 0 and on_first_batch is not None:
            on_first_batch()
        loss = step(images, labels)
        loss_sum += loss
        n += 1
        if cuda and (n % sync_every == 0 or n <= warmup_steps):
            torch.cuda.synchronize(device)  # per-step times between syncs are launch times
        t2 = time.perf_counter()
        meter.record(t1 - t0, t2 - t1, images.shape[0])
        if n % sync_every == 0 or n == total_steps:
            last_loss = float(loss)
        display.update(n, meter, last_loss)
        # Stop requests are checked together on all ranks so that DDP never waits on a rank that left.
        if (info.enabled and n % 10 == 0) or not info.enabled:
            if any_rank(should_stop(), info, device):
                interrupted = n < total_steps
                break
        if n >= total_steps:
            break
        t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
    total, count = all_reduce_sum([float(loss_sum), float(n)], info, device)
    return EpochResult(loss=total / max(1.0, count), steps=n, interrupted=interrupted,
                       timing=meter.summary())


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    from hamengine.engine.metrics import classification_metrics as metrics

    return metrics(y, probs, classes)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None,
            max_steps: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels [N], probabilities [N, C] (float64) and the summed cross-entropy of one pass."""
    model.eval()
    labels_all, probs_all = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (images, labels) in enumerate(batches):
        if max_steps and i >= max_steps:
            break
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        probs_all.append(torch.softmax(logits, 1).double().cpu().numpy())
        labels_all.append(labels.cpu().numpy())
    c = len(CLASSES)
    y = np.concatenate(labels_all) if labels_all else np.zeros(0, np.int64)
    p = np.concatenate(probs_all) if probs_all else np.zeros((0, c))
    return y, p, float(loss_sum)


def evaluate(model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None,
             info: DistInfo, classes: tuple[str, ...] = CLASSES, max_steps: int = 0) -> dict[str, Any]:
    """Validation: every rank scores its shard; probabilities are gathered so that AUC and balanced
    accuracy are computed over the whole split (identical on every rank)."""
    y, p, loss_sum = predict(model, batches, device, amp_dtype, max_steps)
    y, p = gather_arrays([y, p], info)
    (loss_total,) = all_reduce_sum([loss_sum], info, device)
    m = classification_metrics(y, p, classes)
    return {"loss": loss_total / max(1, len(y)), "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"], "macro_auc": m["macro_auc"], "n": int(len(y)),
            "full": m}


def write_eval(out_dir: Path, metrics: dict[str, Any], classes: tuple[str, ...], title: str) -> Path:
    """eval-<split>/metrics.json (+ confusion_matrix.png), both written atomically."""
    from hamengine.engine.plots_eval import plot_confusion
    from hamengine.fileio import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion(metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png", title=title)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return out_dir / "metrics.json"


def evaluate_checkpoint(run_dir: str | Path, split: str = "test", checkpoint: str = "best",
                        device: str | torch.device = "auto", loader: str | None = None,
                        batch_size: int | None = None) -> dict[str, Any]:
    """Score `split` of the run's pack with checkpoints/<checkpoint>.pt; writes
    RUN/eval-<split>/metrics.json and confusion_matrix.png and returns the metrics dict
    (hamengine.engine.metrics.classification_metrics plus run, checkpoint, epoch, split)."""
    from hamengine.config import LoaderKind, TrainConfig, from_dict
    from hamengine.engine.checkpoint import load_checkpoint
    from hamengine.engine.run import RunDir
    from hamengine.engine.trainer import PackSource, amp_dtype_for, loader_config
    from hamengine.models import create_model
    from hamengine.runtime import resolve_device

    run = RunDir(run_dir)
    ckpt_path = run.checkpoints / f"{checkpoint}.pt"
    state = load_checkpoint(ckpt_path)
    cfg = from_dict(TrainConfig, state["config"], where=f"{ckpt_path}:config")
    if loader:
        cfg.loader = LoaderKind(loader)
    if batch_size:
        cfg.batch_size = batch_size
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    classes = tuple(state.get("classes") or CLASSES)
    model = create_model(state.get("model_name", cfg.model), num_classes=len(classes))
    model.load_state_dict(state["model"])
    channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    source = PackSource(cfg.pack)
    batches = source.loader(split, loader_config(cfg, dev, channels_last), dev, 0, 1)
    try:
        y, p, loss_sum = predict(model, batches, dev, amp_dtype_for(cfg, dev))
    finally:
        getattr(batches, "close", lambda: None)()
    m = classification_metrics(y, p, classes)
    m.update({"loss": loss_sum / max(1, len(y)), "split": split, "checkpoint": str(ckpt_path),
              "epoch": state.get("epoch"), "model": cfg.model, "run": str(run.path)})
    write_eval(run.eval_dir(split), m, classes,
               f"{cfg.model} {split}: balanced accuracy {m['balanced_accuracy']:.3f}")
    return m
