"""Per-epoch timing (data time apart from step time) and the rich live display.

Data time = time the training loop waited for the next batch; step time = forward + backward +
optimizer step. On CUDA the loop never synchronizes per step (that would stall the GPU queue): the
loss is summed on the device and read every `sync_every` steps, so per-step times are CPU-side
(launch) times between those reads, while img/s over an epoch is exact (the epoch ends with a sync).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass
class EpochMeter:
    """Timing of one epoch. The first `warmup_steps` steps (compile, allocator, cache warm-up) are
    timed apart, so steady-state img/s is not diluted by one-off costs."""

    warmup_steps: int = 0
    steps: int = 0
    images: int = 0
    data_s: float = 0.0
    step_s: float = 0.0
    warmup_s: float = 0.0
    steady_images: int = 0
    steady_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def record(self, data_s: float, step_s: float, n: int) -> None:
        self.steps += 1
        self.images += n
        if self.steps <= self.warmup_steps:
            self.warmup_s += data_s + step_s
            return
        self.data_s += data_s
        self.step_s += step_s
        self.steady_images += n
        self.steady_s += data_s + step_s

    @property
    def img_per_s(self) -> float:
        """Steady-state images per second (after the warm-up steps)."""
        if self.steady_s > 0:
            return self.steady_images / self.steady_s
        total = self.warmup_s
        return self.images / total if total > 0 else 0.0

    @property
    def data_fraction(self) -> float:
        """Share of steady-state time spent waiting for data (0 = never stalled)."""
        return self.data_s / self.steady_s if self.steady_s > 0 else 0.0

    def summary(self) -> dict[str, float]:
        steady_steps = max(1, self.steps - self.warmup_steps)
        return {"img_per_s": self.img_per_s, "data_ms": 1000 * self.data_s / steady_steps,
                "step_ms": 1000 * self.step_s / steady_steps, "data_fraction": self.data_fraction,
                "warmup_s": self.warmup_s, "wall_s": time.perf_counter() - self.start,
                "images": self.images}


class LiveDisplay:
    """A rich progress bar per epoch with img/s, data vs step time, loss and ETA; silent (no
    output) off a terminal or on ranks other than 0, where only epoch lines are printed."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self) -> LiveDisplay:
        if self.enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    def start_epoch(self, description: str, total: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(description, total=total, stats="")

    def update(self, steps: int, meter: EpochMeter, loss: float | None) -> None:
        if self.progress is None or self.task is None:
            return
        s = meter.summary()
        loss_txt = f" loss {loss:.3f}" if loss is not None else ""
        self.progress.update(self.task, completed=steps,
                             stats=f"{s['img_per_s']:.0f} img/s  data {s['data_ms']:.0f} ms  "
                                   f"step {s['step_ms']:.0f} ms{loss_txt}")

    def log(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
