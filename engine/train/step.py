"""The training step: forward under autocast, loss, backward, clip, optimizer, EMA.

`fit` (engine/train/trainer.py) runs it once per batch; `bench train` times exactly this step.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from hamengine.models.wrappers import unwrap


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
    """forward (autocast) -> loss -> backward (GradScaler for fp16) -> clip -> optimizer -> EMA (the
    loop sets the LR before each step: optim.lr_at). With a compiled model, the first call compiles; a compile failure falls back to the
    eager model with one warning and the step is redone eagerly."""

    def __init__(self, model: nn.Module, eager: nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler | None = None,
                 grad_clip: float | None = None, ema: EMA | None = None):
        self.model, self.eager = model, eager
        self.compiled = model is not eager
        self.optimizer, self.criterion, self.device = optimizer, criterion, device
        self.amp_dtype, self.scaler = amp_dtype, scaler
        self.grad_clip, self.ema = grad_clip, ema
        self.calls = 0
        self.compile_failed: str | None = None

    def _step(self, images: torch.Tensor, labels: torch.Tensor, *meta: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(images, *meta)  # N x C; meta: [N, M] for a metadata-fused model
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
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *meta: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.compiled and self.calls == 1:
            try:
                return self._step(images, labels, *meta)
            except Exception as e:  # torch._dynamo / inductor errors have many types
                self.compile_failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                warnings.warn(f"torch.compile failed ({self.compile_failed}); training eagerly", stacklevel=2)
                self.model, self.compiled = self.eager, False
        return self._step(images, labels, *meta)
