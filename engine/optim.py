"""Optimizer, learning-rate schedule and loss weighting built from a TrainConfig."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from hamengine.config import Optimizer, Schedule, TrainConfig


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


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)
