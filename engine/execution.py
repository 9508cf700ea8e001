"""How a model runs on this machine: device, autocast dtype, memory format and torch.compile,
decided once from a TrainConfig. `fit`, evaluation and `bench train` all use `resolve_execution`,
so the three never disagree on what a config means.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from hamengine.config import Balance, CompileMode, LoaderConfig, MemoryFormat, Precision, TrainConfig
from hamengine.runtime import resolve_device

_PRECISION = {torch.bfloat16: Precision.BF16, torch.float16: Precision.FP16, None: Precision.FP32}


@dataclass(frozen=True)
class Execution:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32, no autocast
    channels_last: bool
    compile: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def precision(self) -> Precision:
        return _PRECISION[self.amp_dtype]

    @property
    def amp_name(self) -> str:
        """'bfloat16', 'float16' or 'fp32': as env.json and bench results record it."""
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype is not None else "fp32"

    def place(self, model: nn.Module) -> nn.Module:
        """Move `model` to the device in the chosen memory format (in place; returns it)."""
        return model.to(self.device, memory_format=self.memory_format)

    def loader_config(self, cfg: TrainConfig, batch_size: int | None = None) -> LoaderConfig:
        """The loader side of `cfg`: batches in this execution's dtype and memory format."""
        fmt = MemoryFormat.CHANNELS_LAST if self.channels_last else MemoryFormat.CONTIGUOUS
        return LoaderConfig(kind=cfg.loader, size=cfg.size, batch_size=batch_size or cfg.batch_size,
                            aug=cfg.aug, dtype=self.precision, workers=cfg.workers, seed=cfg.seed,
                            memory_format=fmt, balance_sampler=cfg.balance == Balance.SAMPLER,
                            meta=cfg.meta, recycle_batches=True)  # train_one_epoch keeps no batch

    def describe(self) -> str:
        return (f"{self.device}, amp {self.amp_name if self.amp_dtype else 'off'}, "
                f"{'channels_last' if self.channels_last else 'NCHW'}, compile {'on' if self.compile else 'off'}")


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


def resolve_execution(cfg: TrainConfig, device: torch.device | str | None = None) -> Execution:
    """channels_last and compile default to on with CUDA, off on CPU (NCHW + bf16 measured faster
    on CPU; inductor's CPU compile costs minutes for little gain on 2 cores)."""
    dev = resolve_device(device if device is not None else cfg.device)
    cuda = dev.type == "cuda"
    channels_last = cfg.channels_last if cfg.channels_last is not None else cuda
    use_compile = cfg.compile == CompileMode.ON or (cfg.compile == CompileMode.AUTO and cuda)
    return Execution(dev, amp_dtype_for(cfg, dev), channels_last, use_compile)


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """Deterministic: bit-exact CPU reruns and resumes. Otherwise cudnn autotunes (fixed shapes)."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels
