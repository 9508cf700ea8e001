"""How a model runs on this machine: device, autocast dtype, memory format and torch.compile,
decided once from a TrainConfig and, on a CPU, from measurement (engine/runtime/hostplan.py). `fit`,
`bench train`, `bench tta`, the demo, the recipes, eval, predict, explain, serve and `doctor` all use
`resolve_execution`, so none disagrees on what a config means on this host.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hamengine.config import Balance, CompileMode, LoaderConfig, MemoryFormat, Precision, TrainConfig
from hamengine.engine.runtime.hostplan import Candidate, Probe, cpu_info, native_bf16, probe_table
from hamengine.runtime import resolve_device

_PRECISION = {torch.bfloat16: Precision.BF16, torch.float16: Precision.FP16, None: Precision.FP32}


@dataclass(frozen=True)
class Plan:
    """Why an Execution is what it is: one reason per choice, and the CPU probe's table."""

    why: dict[str, str]  # amp / channels_last / compile -> reason
    auto: tuple[str, ...] = ()  # the options left to auto (printed "amp auto -> ...")
    img_per_s: dict[str, float] = field(default_factory=dict)  # candidate -> train img/s (CPU probe)
    cached: bool | None = None  # the table came from the cache (None: nothing probed)
    chosen_img_per_s: float | None = None  # the chosen candidate's probe rate
    host: dict[str, Any] | None = None  # CPU model, flags, torch's capability (CPU runs)

    def record(self) -> dict[str, Any]:
        return {"why": self.why, "auto": list(self.auto), "probe_img_per_s": self.img_per_s, "probe_cached": self.cached,
                "chosen_img_per_s": self.chosen_img_per_s, **(self.host or {})}


@dataclass(frozen=True)
class Execution:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32, no autocast
    channels_last: bool
    compile: bool
    plan: Plan = field(default_factory=lambda: Plan({}), compare=False)

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

    def explain(self) -> list[str]:
        """One line per choice, e.g. 'amp auto -> fp32 (bf16 0.06x fp32 here: no native bf16)'."""
        chosen = {"amp": "bf16" if self.amp_dtype == torch.bfloat16 else "fp16" if self.amp_dtype else "fp32",
                  "channels_last": "channels_last" if self.channels_last else "NCHW",
                  "compile": "on" if self.compile else "off"}
        return [f"{k}{' auto' if k in self.plan.auto else ''} -> {chosen[k]} ({why})" for k, why in self.plan.why.items()]

    def record(self) -> dict[str, Any]:
        """env.json's execution record."""
        return {"device": str(self.device), "amp_dtype": self.amp_name, "channels_last": self.channels_last,
                "compile": self.compile, "plan": self.plan.record()}


BF16_MIN_GAIN = 1.1  # auto keeps bf16 only when it trains at least this much faster than fp32
# torch.compile on CPU: inductor costs ~50-70 s on 2 cores (hamnet; C++ codegen) before the first step.
# auto compiles there only when even a generous speed-up could earn that back within the run.
CPU_COMPILE_COST_S = 90.0
CPU_COMPILE_GAIN = 0.3  # hamnet 160 px, 2 threads: 0.198 -> 0.119 s a step (bf16), 0.346 -> 0.233 (fp32, AVX2); ~0.1 on one


@dataclass(frozen=True)
class RunShape:
    """What the decision needs to know of the run beyond its config: how many training images it
    will push through (compile pays back over them), or its budget in seconds."""

    images: int | None = None  # epochs x images per epoch; None: unknown (compile auto stays off on CPU)
    budget_s: float | None = None


def _forced_precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, str] | None:
    """The autocast dtype a flag forces, with the reason; None when `auto` must decide."""
    if not cfg.amp:
        return None, "--no-amp"
    if cfg.amp_dtype == Precision.FP32:
        return None, "--amp-dtype fp32"
    if cfg.amp_dtype == Precision.FP16:
        return torch.float16, "--amp-dtype fp16 (GradScaler)"
    if cfg.amp_dtype == Precision.BF16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            warnings.warn("this GPU has no bf16: using fp16 autocast with a GradScaler", stacklevel=3)
            return torch.float16, "--amp-dtype bf16 asked, no bf16 on this GPU: fp16 (GradScaler)"
        return torch.bfloat16, "--amp-dtype bf16"
    if device.type == "cuda":  # auto on CUDA: tensor cores run both; bf16 needs no scaler
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA with bf16"
        return torch.float16, "CUDA without bf16: fp16 with a GradScaler"
    return None


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


_AMP_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "fp32": None}


def _kept(cfg: TrainConfig, kept: Mapping[str, Any] | None) -> tuple[tuple[torch.dtype | None, str] | None, bool | None]:
    """A resumed run continues in the precision and memory format its env.json records wherever
    the options were left to auto: a re-measurement (another host, a lost cache, a rate near the
    bar) must not switch a bf16 run to fp32 halfway, nor break a --deterministic resume."""
    if not kept:
        return None, None
    amp = None
    if cfg.amp and cfg.amp_dtype == Precision.AUTO and kept.get("amp_dtype") in _AMP_NAMES:
        amp = (_AMP_NAMES[kept["amp_dtype"]], "kept from the run's env.json on --resume")
    fmt = kept.get("channels_last") if cfg.channels_last is None and isinstance(kept.get("channels_last"), bool) else None
    return amp, fmt


def resolve_execution(cfg: TrainConfig, device: torch.device | str | None = None, *, shape: RunShape | None = None,
                      inference: bool = False, probe: Probe | None = None,
                      kept: Mapping[str, Any] | None = None) -> Execution:
    """The one decision of how a model runs here: device, autocast dtype, memory format, compile.

    Flags force (`--no-amp`, `--amp-dtype bf16|fp16|fp32`, `--channels-last/--no-channels-last`,
    `--compile on|off`); `auto` decides. On CUDA: bf16 where supported (fp16 + GradScaler
    otherwise), channels_last, compile on. On CPU: measured (engine/runtime/hostplan.py) -- fp32 vs bf16 and
    NCHW vs channels_last for this model, side and batch, the fastest kept, bf16 only when at least
    BF16_MIN_GAIN faster than fp32; compile only when the run is long enough to pay for it.
    `inference`: eval/predict/serve/explain, which run fp32 (scores before speed) and never compile;
    their memory format follows the same measurement (the run's model, side and batch).
    `probe` replaces the measurement (tests); `kept`: a resumed run's env.json (see _kept). A probe
    that fails (out of memory, an operator missing) leaves fp32/NCHW with the error as the reason.
    The Execution carries the reasons and the table."""
    dev = resolve_device(device if device is not None else cfg.device)
    cuda = dev.type == "cuda"
    kept_amp, kept_format = _kept(cfg, None if inference else kept)
    if kept_format is not None:
        cfg = dataclasses.replace(cfg, channels_last=kept_format)
    forced = (None, "inference runs fp32") if inference else kept_amp or _forced_precision(cfg, dev)
    why: dict[str, str] = {}
    table: dict[str, float] = {}
    cached = None
    candidates = _candidates(cfg, dev, forced)
    failed = None
    if candidates:
        try:
            table, cached = probe_table(cfg.model, cfg.size, cfg.batch_size, candidates, probe)
        except (RuntimeError, ValueError, MemoryError) as e:  # a plan must not cost the run: fall back
            failed = f"probe failed ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
            warnings.warn(f"execution probe failed, running fp32/NCHW: {e}", stacklevel=2)
    # precision
    if forced is not None:
        amp_dtype, why["amp"] = forced
    elif failed:
        amp_dtype, why["amp"] = None, failed
    else:  # CPU auto: compare the best of each precision
        fp32 = max(v for k, v in table.items() if k.startswith("fp32/"))
        bf16 = max(v for k, v in table.items() if k.startswith("bf16/"))
        amp_dtype = torch.bfloat16 if bf16 >= BF16_MIN_GAIN * fp32 else None
        hint = "" if amp_dtype is not None else (
            ": no native bf16" if not native_bf16(cpu_info()) else f": under the {BF16_MIN_GAIN}x bar")
        why["amp"] = f"bf16 {_ratio(bf16, fp32)} fp32 here{hint}"
    # memory format
    prec = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    if cfg.channels_last is not None:
        channels_last = cfg.channels_last
        why["channels_last"] = ("kept from the run's env.json on --resume" if kept_format is not None else
                                "--channels-last" if channels_last else "--no-channels-last")
    elif failed:
        channels_last, why["channels_last"] = False, failed
    elif cuda or amp_dtype == torch.float16:
        channels_last, why["channels_last"] = cuda, "CUDA: tensor-core convolutions" if cuda else "fp16 on CPU: default"
    else:
        nchw, cl = table[f"{prec}/NCHW"], table[f"{prec}/channels_last"]
        channels_last = cl > nchw
        why["channels_last"] = f"channels_last {_ratio(cl, nchw)} NCHW at {prec} here"
    # compile
    use_compile, why["compile"] = _compile_choice(cfg, dev, inference, shape, table, prec, channels_last)
    best = table.get(f"{prec}/{'channels_last' if channels_last else 'NCHW'}")
    auto = tuple(k for k, left in (("amp", not inference and kept_amp is None and cfg.amp
                                    and cfg.amp_dtype == Precision.AUTO),
                                   ("channels_last", cfg.channels_last is None),
                                   ("compile", not inference and cfg.compile == CompileMode.AUTO)) if left)
    return Execution(dev, amp_dtype, channels_last, use_compile,
                     plan=Plan(why, auto, table, cached, best, cpu_info() if not cuda else None))


def _candidates(cfg: TrainConfig, dev: torch.device, forced: tuple[torch.dtype | None, str] | None) -> list[Candidate]:
    """What the CPU probe must time: both precisions when auto decides it, both memory formats when
    --channels-last is not given, the forced one otherwise (fp16 on CPU is only ever forced, and not
    probed)."""
    if dev.type != "cpu":
        return []
    if forced is None:
        precisions = [Precision.FP32, Precision.BF16]
    elif forced[0] is None:
        precisions = [Precision.FP32]
    elif forced[0] == torch.bfloat16:
        precisions = [Precision.BF16]
    else:
        return []
    formats = [False, True] if cfg.channels_last is None else [cfg.channels_last]
    # a fully forced pair is still timed: compile auto and --budget-sides need the run's rate
    return [Candidate(p, cl) for p in precisions for cl in formats]


def _compile_choice(cfg: TrainConfig, dev: torch.device, inference: bool, shape: RunShape | None,
                    table: dict[str, float], prec: str, channels_last: bool) -> tuple[bool, str]:
    if inference:
        return False, "inference: eager"
    if cfg.compile == CompileMode.ON:
        return True, "--compile on"
    if cfg.compile == CompileMode.OFF:
        return False, "--compile off"
    if dev.type == "cuda":
        return True, "CUDA"
    # CPU: the most it could save is CPU_COMPILE_GAIN of the run's step time; it costs CPU_COMPILE_COST_S first.
    rate = table.get(f"{prec}/{'channels_last' if channels_last else 'NCHW'}")
    if shape is None or rate is None or (shape.images is None and shape.budget_s is None):
        return False, "CPU, run length unknown: eager"
    run_s = shape.budget_s if shape.budget_s is not None else shape.images / rate
    saved = CPU_COMPILE_GAIN * run_s
    # progressive resizing compiles once per train side (multiples of 32 from the floor to --size)
    sides = len(range(cfg.progressive_min_size // 32 * 32, cfg.size, 32)) + 1 if cfg.progressive_min_size else 1
    cost = CPU_COMPILE_COST_S * sides
    what = f"{sides} compiles" if sides > 1 else "a compile"
    if saved <= cost:
        return False, f"CPU run ~{run_s / 60:.0f} min: {what} (~{cost / 60:.0f} min) cannot pay back"
    return True, f"CPU run ~{run_s / 60:.0f} min: {what} (~{cost / 60:.0f} min) can pay back"


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """Deterministic: bit-exact CPU reruns and resumes. Otherwise cudnn autotunes (fixed shapes)."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels
