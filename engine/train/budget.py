"""--budget: plan the number of epochs to fit a wall-clock budget, and the deadline that guards it.

After setup, `plan_budget` times training steps at each distinct progressive size and forward passes
at the target size, then picks the most epochs for which

    setup + sum over epochs (train + val) + test evaluation <= FILL x budget.

The probe runs forward + backward on a deep copy of the model (no optimizer step): the real model,
its BatchNorm statistics, the optimizer state and the RNG-driven loaders are untouched, so a budget
run trains exactly like the same run with --epochs set by hand. The probe's inputs are random
tensors of the loader's batch shape, so loader time is not in the estimate (the shipped loaders run
ahead of the step); the deadline below covers any shortfall: training stops at a step boundary once
only the reserved test-evaluation time is left, and the test evaluation still runs.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hamengine.config import TTA, TrainConfig, parse_duration
from hamengine.engine.train.resize import size_for_epoch
from hamengine.engine.train.step import autocast

FILL = 0.92  # planned share of the budget; the rest absorbs estimate error (loader time, noise)
TTA_VIEWS = {TTA.NONE: 1, TTA.FLIPS: 4, TTA.FLIPS_ROT: 8}
# The test evaluation's fixed cost beyond its forward passes: checkpoint, loader, metrics files and
# figures (about 10 s measured on 2 loaded CPU cores; far less on a GPU host, so it is generous there).
TEST_FIXED_S = 10.0
WARMUP, TIMED = 2, 3  # probe steps per size: warm-up (allocator, kernels) excluded, then timed


@dataclass
class BudgetPlan:
    budget_s: float
    setup_s: float
    epochs: int
    train_img_per_s: dict[int, float]  # per train side, forward + backward
    eval_img_per_s: float  # forward at the target size
    val_s: float  # estimated validation seconds per epoch
    test_s: float  # estimated test-evaluation seconds (with its TTA views)
    planned_s: float  # setup + epochs x (train + val) + test, estimated
    deadline_s: float = 0.0  # seconds after fit started at which training stops (test time reserved)
    started: float = field(default=0.0, repr=False)  # perf_counter at fit start
    replanned_after: list[int] = field(default_factory=list)  # epochs after which replan ran

    epoch_scale: float = 1.0  # measured / estimated cost of the last re-planned epoch (set by replan)
    side_choice: dict[str, Any] | None = None  # --budget-sides: the sides weighed and the one chosen

    def expired(self) -> bool:
        return time.perf_counter() - self.started >= self.deadline_s

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("started")
        d["train_img_per_s"] = {str(k): v for k, v in self.train_img_per_s.items()}
        return d


def train_sizes(cfg: TrainConfig, epochs: int) -> list[int]:
    return [size_for_epoch(e, epochs, cfg.progressive_min_size, cfg.size, cfg.progressive_end)
            for e in range(epochs)]


def _time(fn: Any, device: torch.device) -> float:
    """Seconds per call of fn over TIMED calls, after WARMUP untimed ones."""
    for _ in range(WARMUP):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(TIMED):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / TIMED


def probe(model: torch.nn.Module, criterion: Any, sizes: set[int], eval_size: int, batch: int,
          device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> tuple[dict[int, float], float]:
    """Train img/s per side (forward + backward of a copy) and eval img/s at eval_size (forward)."""
    m = copy.deepcopy(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def batch_of(side: int) -> torch.Tensor:
        return torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=fmt)

    def train_step(x: torch.Tensor) -> None:
        with autocast(device, amp_dtype):
            loss = criterion(m(x).float(), labels)
        loss.backward()
        m.zero_grad(set_to_none=True)

    m.train()
    train = {}
    for side in sorted(sizes):
        x = batch_of(side)
        train[side] = batch / _time(lambda x=x: train_step(x), device)
    m.eval()
    x = batch_of(eval_size)

    @torch.no_grad()
    def forward() -> None:
        with autocast(device, amp_dtype):
            m(x)
    evals = batch / _time(forward, device)
    return train, evals


def choose_epochs(cfg: TrainConfig, budget_s: float, setup_s: float, train_images: int,
                  train_ips: dict[int, float], val_s: float, test_s: float) -> tuple[int, float]:
    """The most epochs (>= 1) whose estimate fits FILL x budget, and that estimate. The sizes of a
    plan depend on its epoch count (the ramp scales with it), so each count is costed whole."""
    def cost(epochs: int) -> float:
        return setup_s + test_s + sum(train_images / train_ips[s] + val_s for s in train_sizes(cfg, epochs))

    epochs = 1
    while epochs < 100_000 and cost(epochs + 1) <= FILL * budget_s:
        epochs += 1
    return epochs, cost(epochs)


def plan_budget(t: Any, started: float, replan: bool = True) -> BudgetPlan:
    """Measure, choose the epochs (unless resuming: config.json's planned epochs stay), set the
    deadline, write RUN/budget.json and print the plan. Returns the plan; cfg is not changed (the
    caller hands plan.epochs to the loop)."""
    cfg, ex, source = t.cfg, t.ex, t.source
    budget_s = parse_duration(cfg.budget)
    # Every side a plan of any length can use: the multiples of 32 from min_size's, and the target.
    low = max(32, cfg.progressive_min_size // 32 * 32) if cfg.progressive_min_size else cfg.size
    all_sizes = set(range(low, cfg.size, 32)) | {cfg.size}
    criterion = torch.nn.CrossEntropyLoss()
    train_ips, eval_ips = probe(t.model, criterion, all_sizes, cfg.size, cfg.batch_size, ex.device,
                                ex.amp_dtype, ex.channels_last)
    world = t.info.world_size
    val_s = len(source.labels("val")) / world / eval_ips
    test_s = len(source.labels("test")) * TTA_VIEWS[TTA(cfg.test_tta)] / eval_ips + TEST_FIXED_S
    train_images = t.steps_per_epoch * cfg.batch_size
    probe_s = time.perf_counter() - started
    if replan:
        epochs, planned = choose_epochs(cfg, budget_s, probe_s, train_images, train_ips, val_s, test_s)
    else:
        epochs = cfg.epochs
        planned = probe_s + test_s + sum(train_images / train_ips[s] + val_s for s in train_sizes(cfg, epochs))
    # Hard guard: stop training when only the test evaluation's time (with margin) is left.
    deadline = max(0.0, 0.98 * budget_s - 1.5 * test_s)
    plan = BudgetPlan(budget_s, probe_s, epochs, train_ips, eval_ips, val_s, test_s, planned, deadline, started,
                      side_choice=getattr(t, "side_choice", None))
    if t.info.is_main:
        write_plan(t, plan)
        ips = ", ".join(f"{s}px {v:.0f}" for s, v in sorted(train_ips.items()))
        if plan.side_choice and "estimated_epochs" in plan.side_choice:
            est = ", ".join(f"{k}px ~{v}" for k, v in plan.side_choice["estimated_epochs"].items())
            t.say(f"[bold]budget side[/] estimated epochs {est} -> {plan.side_choice['why']}")
        t.say(f"[bold]budget[/] {budget_s:.0f} s: setup {probe_s:.1f} s, train img/s {ips}, val {val_s:.1f} s/epoch, "
              f"test {test_s:.1f} s -> {epochs} epochs (estimate {planned:.0f} s, {FILL:.0%} of the budget); "
              f"training stops by {deadline:.0f} s")
    return plan


# --budget-sides: an epoch costs about this many times its probe estimate (loader hand-over, validation
# at a third of the train cost per image, checkpoints): the re-plans' epoch_scale on 2 CPU cores.
SIDE_EPOCH_OVERHEAD = 1.3


def choose_side(cfg: TrainConfig, train_images: int, val_images: int, rate_at: Any) -> dict[str, Any]:
    """--budget with --budget-sides: the largest side whose estimated epochs in the budget reach
    --budget-min-epochs, else the smallest side (a slow host trains small for enough epochs rather
    than large for a few). rate_at(side) -> train img/s of the run's own plan at that side (the
    resolve_execution probe, cached per host), or None where nothing was measured (CUDA: --size stays).
    Returns the record kept in budget.json; its "size" is the side to train at."""
    budget_s = parse_duration(cfg.budget)
    sides = sorted(cfg.budget_side_list())
    rates = {s: rate_at(s) for s in sides}
    if any(r is None for r in rates.values()):
        return {"sides": sides, "size": cfg.size, "why": "no CPU probe on this device: --size kept"}
    # an epoch: train images at the probe's rate, val images forward only (about 3x cheaper each)
    epochs = {s: int(FILL * budget_s / (SIDE_EPOCH_OVERHEAD * (train_images + val_images / 3) / rates[s]))
              for s in sides}
    fit = [s for s in sides if epochs[s] >= cfg.budget_min_epochs]
    size = fit[-1] if fit else sides[0]
    why = (f"{size}px: the largest side with >= {cfg.budget_min_epochs} estimated epochs" if fit else
           f"{size}px: no side reaches {cfg.budget_min_epochs} estimated epochs, the smallest trains the most")
    return {"sides": sides, "img_per_s": {str(s): rates[s] for s in sides},
            "estimated_epochs": {str(s): epochs[s] for s in sides}, "min_epochs": cfg.budget_min_epochs,
            "size": size, "why": why}


def write_plan(t: Any, plan: BudgetPlan) -> None:
    t.run.budget.write_text(json.dumps(plan.record(), indent=2) + "\n", encoding="utf-8")


REPLAN_AFTER = (1, 2)  # epochs after which the plan is always re-chosen from measured cost
LATE_REPLAN = 0.1  # ... and once more after this share of the planned epochs (at least epoch 3)


def replan_due(plan: BudgetPlan, done: int) -> bool:
    """Whether to re-plan after epoch `done`: after epochs 1 and 2, then once after
    max(3, LATE_REPLAN x the planned epochs), when the steady-state cost is a mean over several epochs."""
    if done in REPLAN_AFTER:
        return True
    late = [d for d in plan.replanned_after if d not in REPLAN_AFTER]
    return not late and done >= max(3, round(LATE_REPLAN * plan.epochs))


def replan(t: Any, plan: BudgetPlan, elapsed_s: float, epoch_s: float, done: int) -> int:
    """Scale the per-epoch estimate by what the epochs really cost and choose the epochs again,
    counting the time already spent as spent. The probe misses loader, validation-loader and
    checkpoint/plot time.

    `epoch_s` is epoch 1's cost after epoch 1, and afterwards the MEAN cost of epochs 2..done (the
    steady state): epoch 1 carries one-time costs (torch.compile, allocator and loader warm-up; 25% of
    the epoch on 2 CPU cores), and one later epoch alone is noisy (a plan scaled by epoch 2 alone
    used 75-94% of 20-minute budgets). The late re-plan (replan_due) falls about 10% into the run:
    moving the schedule's end there only re-slopes the remaining ramp or decay; no step already
    taken changes.
    Returns the epochs of the new plan (the caller hands them to the loop; cfg is not changed)."""
    cfg = t.cfg
    sizes = train_sizes(cfg, plan.epochs)
    images = t.steps_per_epoch * cfg.batch_size
    measured = range(0, 1) if done == 1 else range(1, done)  # the epoch indices epoch_s covers
    estimated = sum(images / plan.train_img_per_s[sizes[e]] + plan.val_s for e in measured) / len(measured)
    # Floor 0.5: a last epoch far cheaper than the probe is noise, not a reason to plan double.
    plan.epoch_scale = max(0.5, epoch_s / max(1e-6, estimated))
    ips = {k: v / plan.epoch_scale for k, v in plan.train_img_per_s.items()}
    val_s = plan.val_s * plan.epoch_scale

    def cost(epochs: int) -> float:  # spent so far + the remaining epochs at the measured rate + test
        rest = train_sizes(cfg, epochs)[done:]
        return elapsed_s + plan.test_s + sum(images / ips[s] + val_s for s in rest)

    epochs = done
    while epochs < 100_000 and cost(epochs + 1) <= FILL * plan.budget_s:
        epochs += 1
    epochs = max(epochs, done)
    plan.replanned_after.append(done)
    plan.planned_s = cost(epochs)
    plan.epochs = epochs
    if t.info.is_main:
        write_plan(t, plan)
        t.say(f"budget: epoch {done} cost {plan.epoch_scale:.2f}x the estimate -> {epochs} epochs "
              f"(estimate {plan.planned_s:.0f} s)")
    return epochs
