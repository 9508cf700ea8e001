"""Optimizer, learning-rate schedule and loss weighting built from a TrainConfig."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from hamengine.config import Balance, Optimizer, Schedule, TrainConfig


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


def lr_at(step: int, cfg: TrainConfig, epochs: int, steps_per_epoch: int) -> float:
    """The LR multiplier at optimizer step `step` (0-based) of a run planned at `epochs` x
    `steps_per_epoch`: a pure function, applied before every step as nanoGPT's get_lr(it). A --budget
    re-plan hands the loop a new `epochs`; the steps already taken keep their rates, the rest follow.

    Linear warm-up over warmup_epochs, then cosine to 0 (or constant). onecycle: warm-up over
    max(warmup_epochs, onecycle_peak x epochs; 20% by default), then a straight line to 0 at the last
    step (the triangular one-cycle of fast-training recipes such as airbench and FFCV's, whose ResNet
    configs peak at epoch 2: no long tail at a tiny LR)."""
    onecycle = cfg.schedule == Schedule.ONECYCLE
    warm_epochs = max(cfg.warmup_epochs, cfg.onecycle_peak * epochs) if onecycle else cfg.warmup_epochs
    warm = max(0, round(warm_epochs * steps_per_epoch))
    total = max(1, epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == Schedule.CONSTANT:
        return 1.0
    if onecycle:
        return max(0.0, (total - step) / max(1, total - warm))
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Every parameter group at its base LR (as built from the config) x factor."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor


def class_weights(labels: np.ndarray, num_classes: int, beta: float | None = None) -> torch.Tensor:
    """Per-class loss weights, mean 1 over the classes present (absent classes 0).

    beta None: inverse frequency, 1 / n_c. beta in (0, 1): the inverse effective number of samples
    (1 - beta) / (1 - beta^n_c) (Cui et al., CVPR 2019), which grows slower than 1 / n_c for the
    large classes: near 1 / n_c while beta * n_c << 1, flattening once n_c passes ~1 / (1 - beta)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    if beta is None:
        w = np.where(present, 1.0 / np.maximum(counts, 1), 0.0)
    else:
        w = np.where(present, (1.0 - beta) / (1.0 - np.power(beta, np.maximum(counts, 1))), 0.0)
    return torch.tensor(w / w[present].mean(), dtype=torch.float32)


EFFECTIVE_BETA = 0.999  # Cui et al.'s best long-tail CIFAR/iNaturalist setting; 1 / (1 - beta) = 1,000 images


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on z + tau * log(prior) (Menon et al., ICLR 2021, eq. 10).

    Adding the log prior during training makes the plain logits z estimate the class-balanced
    posterior, so argmax z targets balanced error with no sampler or weights, and works with every
    loader kind (DALI's reader cannot sample by weight). Inference uses z unchanged."""

    def __init__(self, labels: np.ndarray, num_classes: int, tau: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64) + 1.0  # +1: no log(0)
        self.register_buffer("offset", torch.tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits + self.offset, target, label_smoothing=self.label_smoothing)


def build_criterion(cfg: TrainConfig, train_labels: np.ndarray, num_classes: int) -> nn.Module:
    """The training loss for cfg.balance (sampler and none: plain cross-entropy)."""
    if cfg.balance == Balance.LOGIT_ADJUST:
        return LogitAdjustedLoss(train_labels, num_classes, label_smoothing=cfg.label_smoothing)
    weight = None
    if cfg.balance == Balance.LOSS:
        weight = class_weights(train_labels, num_classes)
    elif cfg.balance == Balance.EFFECTIVE:
        weight = class_weights(train_labels, num_classes, beta=EFFECTIVE_BETA)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
