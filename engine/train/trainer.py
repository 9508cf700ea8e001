"""`fit(cfg)`: one training run from a resolved TrainConfig into its run directory.

    fit = setup -> per epoch: train_one_epoch -> evaluate (val) -> save -> test evaluation (evaluate_run)

Resume is exact at epoch boundaries: last.pt is written after every completed epoch (after its
validation) with model, optimizer, scheduler, scaler, EMA, every rank's RNG states and the epoch;
loaders are re-seeded by set_epoch(epoch), and the global RNGs restart from (seed, epoch, rank) at
each epoch's first batch (see train_one_epoch). SIGINT/SIGTERM stop at the next step boundary and
exit cleanly WITHOUT saving the partial epoch: last.pt stays the last completed epoch, which
`--resume` continues bit-for-bit (deterministic settings); at most one epoch of work is redone.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from hamengine.config import CLASSES, Decision, TrainConfig, parse_duration, to_dict
from hamengine.engine.evaluate.evaluator import EvalOptions, evaluate_run
from hamengine.engine.evaluate.metrics import classification_metrics
from hamengine.engine.runtime.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from hamengine.engine.runtime.environment import hardware
from hamengine.engine.runtime.execution import Execution, RunShape, configure_backends, resolve_execution
from hamengine.engine.runtime.run import RunDir
from hamengine.engine.train import distributed as D
from hamengine.engine.train.budget import choose_side, plan_budget, replan, replan_due
from hamengine.engine.train.data import PackSource
from hamengine.engine.train.logger import EpochMeter, LiveDisplay
from hamengine.engine.train.optim import build_criterion, build_optimizer, lr_at, set_lr
from hamengine.engine.train.prefetch import ThreadPrefetcher
from hamengine.engine.train.resize import resize_batch, size_for_epoch
from hamengine.engine.train.signals import StopRequest
from hamengine.engine.train.step import EMA, TrainStep, autocast
from hamengine.errors import ConfigError
from hamengine.fileio import atomic_write_text
from hamengine.hooks import fire
from hamengine.loaders.ingest.metadata import MetaSchema, drop_fields
from hamengine.models import create_model
from hamengine.models.wrappers import unwrap


@dataclass
class FitOptions:
    """Run-time choices that are not part of the saved config (recorded in env.json)."""

    deterministic: bool = False  # bit-exact CPU reruns/resumes (torch.use_deterministic_algorithms)
    prefetch: bool | None = None  # background-thread prefetch; None: off (loaders run ahead already)
    console: Console = field(default_factory=Console)
    source: Any = None  # a PackSource-like object (labels, loader, classes); None: PackSource(cfg.pack)
    test_eval: bool = True  # score the run's judged weights (cfg.checkpoint) on the test split when training ends


@dataclass
class Progress:
    """Where the run stands: what resume restores besides the weights."""

    epoch: int = 0  # epochs completed
    best: float = -1.0  # best val balanced accuracy so far
    best_epoch: int = 0
    since_best: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl so far (rank 0)

    def improve(self, metric: float) -> bool:
        if metric > self.best:
            self.best, self.best_epoch, self.since_best = metric, self.epoch, 0
            return True
        self.since_best += 1
        return False


@dataclass
class EpochResult:
    loss: float
    steps: int
    interrupted: bool
    timing: dict[str, float]
    train_size: int = 0  # the side the train batches were resized to (progressive resizing)
    budget_stop: bool = False  # stopped at the --budget deadline (the test evaluation still runs)


@dataclass
class Trainer:
    """Everything `setup` builds; the phases below read and update it."""

    cfg: TrainConfig
    opts: FitOptions
    info: D.DistInfo
    ex: Execution
    run: RunDir
    source: Any
    classes: tuple[str, ...]
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    model: nn.Module  # the plain module (not DDP-wrapped, not compiled): what checkpoints hold
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]  # each param group's LR as built from the config; the LR is base x lr_at(step)
    epochs: int  # the planned length: cfg.epochs, or what --budget planned (re-plans hand a new one)
    scaler: torch.amp.GradScaler | None
    ema: EMA | None
    step: TrainStep | None = None
    progress: Progress = field(default_factory=Progress)
    warmup_s: float | None = None  # this process's first steps (compile, allocator, cache warm-up)
    started: float = 0.0  # perf_counter when fit began: metrics rows' elapsed_s
    budget: Any = None  # engine/budget.BudgetPlan with --budget
    budget_mark: float = 0.0  # seconds since start at the end of epoch 1 (later re-plans cost epochs 2..done)
    side_choice: dict[str, Any] | None = None  # --budget-sides: the sides weighed, the one chosen (budget.json)
    meta_schema: Any = None  # loaders.metadata.MetaSchema with --meta (RUN/metadata.json)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def say(self, *args: Any, **kwargs: Any) -> None:
        if self.info.is_main:
            self.opts.console.print(*args, **kwargs)


def fit(cfg: TrainConfig, opts: FitOptions | None = None) -> dict[str, Any]:
    """Train `cfg` into RunDir(cfg.out); returns a summary dict (run, epochs, best, test metrics)."""
    opts = opts or FitOptions()
    cfg.check()
    info, device = D.init_distributed(cfg.device)
    loaders: list[Any] = []  # closed whatever happens: worker processes, DALI pipelines
    try:
        started = time.perf_counter()
        t = setup(cfg, opts, info, device, loaders)
        t.started = started
        if cfg.budget:
            apply_budget(t)
        interrupted = False
        with StopRequest() as stop, LiveDisplay(opts.console, enabled=info.is_main) as display:
            epoch = t.progress.epoch
            while epoch < t.epochs:  # not range(): a --budget re-plan after epochs 1-2 changes t.epochs
                res = train_one_epoch(t, epoch, display, stop)
                if res.interrupted:
                    interrupted = True
                    break
                if res.budget_stop:
                    t.say(f"budget: training stopped in epoch {epoch + 1} to leave time for the test evaluation")
                    break
                t.val_loader.set_epoch(0)
                v0 = time.perf_counter()
                val = evaluate(t.eval_model, t.val_loader, t.ex, info, t.classes)
                val["seconds"] = time.perf_counter() - v0
                save(t, epoch, res, val, display)
                if t.budget is not None and not cfg.resume and replan_due(t.budget, epoch + 1):
                    replan_budget(t, epoch + 1)
                if cfg.early_stop and t.progress.since_best >= cfg.early_stop:
                    t.say(f"early stop: no balanced-accuracy gain for {t.progress.since_best} epochs")
                    break
                epoch += 1
        summary = summarize(t, interrupted)
        if interrupted:
            explain_interrupt(t, stop.signum)
        elif opts.test_eval and info.is_main and t.run.checkpoint(str(cfg.checkpoint)).exists():
            summary.update(test_evaluation(t))
        D.barrier(info)
        return summary
    finally:
        for loader in loaders:
            getattr(loader, "close", lambda: None)()
        D.shutdown()


# ---------------------------------------------------------------- setup

def seed_all(seed: int) -> None:
    seed %= 2**63
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def setup(cfg: TrainConfig, opts: FitOptions, info: D.DistInfo, device: torch.device,
          loaders: list[Any]) -> Trainer:
    """Run folder, seeds, loaders, model, optimizer, resume, run files, DDP/compile: ready to train."""

    run = RunDir(cfg.out)
    if info.is_main:
        run.prepare(cfg)
    D.barrier(info)
    source = opts.source or PackSource(cfg.pack)
    check_splits(cfg, source)
    side_choice = choose_budget_side(cfg, source, info, device)  # --budget-sides: may set cfg.size
    # Rank 0 decides (measuring on a CPU) and every rank runs its decision on its own device, so all
    # ranks train in one precision and memory format. A resumed run keeps what its env.json records.
    ex = resolve_execution(cfg, device, shape=run_shape(cfg, source, info.world_size),
                           kept=run.read_env() if cfg.resume else None) if info.is_main else None
    ex = dataclasses.replace(D.broadcast_object(ex, info), device=device)
    configure_backends(device, opts.deterministic)
    seed_all(cfg.seed + info.rank)

    classes = tuple(getattr(source, "classes", CLASSES))
    schema = meta_schema_of(cfg, source)
    lcfg = ex.loader_config(cfg)
    lcfg.meta_schema = schema  # --meta: batches carry [N, M] metadata in the run's encoding
    train_loader = source.loader("train", lcfg, device, info.rank, info.world_size)
    val_loader = source.loader("val", lcfg, device, info.rank, info.world_size)
    loaders += [train_loader, val_loader]
    steps = len(train_loader) if not cfg.max_steps_per_epoch else min(len(train_loader), cfg.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError(f"the train split has fewer samples than one batch ({cfg.batch_size} x "
                          f"{info.world_size} ranks): lower --batch-size")

    model = ex.place(create_model(cfg.model, num_classes=len(classes), pretrained=cfg.pretrained,
                                  pretrained_path=cfg.pretrained_path,
                                  meta_missing=torch.from_numpy(schema.missing()) if schema else None))
    optimizer = build_optimizer(model, cfg)
    t = Trainer(cfg, opts, info, ex, run, source, classes, train_loader, val_loader, steps, model, optimizer,
                base_lrs=[g["lr"] for g in optimizer.param_groups], epochs=cfg.epochs,
                scaler=torch.amp.GradScaler(device.type) if ex.amp_dtype == torch.float16 else None,
                ema=EMA(model, cfg.ema) if cfg.ema else None, meta_schema=schema, side_choice=side_choice)
    if cfg.resume:
        restore(t)
    if info.is_main:
        write_run_files(t)
    t.step = build_step(t)
    t.say(f"[bold]train[/] {cfg.model} on {info.world_size} process(es): {ex.describe()}, {steps} steps/epoch "
          f"x {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.size}px, loader "
          f"{getattr(train_loader, 'kind', cfg.loader)} -> {run.path}")
    for line in ex.explain():  # e.g. "amp auto -> fp32 (bf16 0.06x fp32 here: no native bf16)"
        t.say(f"  [dim]{line}[/]")
    return t


def choose_budget_side(cfg: TrainConfig, source: Any, info: D.DistInfo, device: torch.device) -> dict[str, Any] | None:
    """--budget with --budget-sides (a new, single-process run): set cfg.size to the side the host
    can train for enough epochs, from the same measured plan resolve_execution uses at each side."""

    if not (cfg.budget and cfg.budget_sides) or cfg.resume:
        return None
    if info.world_size > 1:  # each rank would measure on its own and could choose differently
        return {"size": cfg.size, "why": "distributed run: --size kept"}

    def rate_at(side: int) -> float | None:
        return resolve_execution(dataclasses.replace(cfg, size=side), device).plan.chosen_img_per_s

    choice = choose_side(cfg, len(source.labels("train")), len(source.labels("val")), rate_at)
    cfg.size = int(choice["size"])
    if cfg.progressive_min_size > cfg.size:  # a floor above the chosen side: no ramp (as apply_recipe does)
        cfg.progressive_min_size = 0
    return choice


def run_shape(cfg: TrainConfig, source: Any, world_size: int) -> RunShape:
    """The run's length for the compile decision: images it will train on, or its budget."""
    per_epoch = len(source.labels("train")) // max(1, world_size)
    if cfg.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.max_steps_per_epoch * cfg.batch_size)
    return RunShape(images=per_epoch * cfg.epochs, budget_s=parse_duration(cfg.budget) if cfg.budget else None)


def apply_budget(t: Trainer) -> None:
    """--budget: plan the epochs (a new run; a resumed one keeps config.json's) and hand them to the loop."""

    t.budget = plan_budget(t, t.started, replan=not t.cfg.resume)
    if not t.cfg.resume:
        follow_plan(t, t.budget.epochs)


def follow_plan(t: Trainer, epochs: int) -> None:
    """The loop, the LR schedule (lr_at reads t.epochs) and progressive resizing follow `epochs`;
    config.json records it (what a resume continues)."""
    t.epochs = epochs
    if t.info.is_main:
        t.run.write_config(dataclasses.replace(t.cfg, epochs=epochs))


def replan_budget(t: Trainer, done: int) -> None:
    """After epoch `done` (1, 2, and once about 10% in: budget.replan_due) of a --budget run:
    re-choose the epochs from their real cost and re-target the LR schedule (same step count so far;
    the remaining steps follow the new length)."""

    # The same measurement on every rank (averaged), so all ranks choose the same epochs.
    now = time.perf_counter() - t.started
    # Epoch 1 alone; later, the mean of epochs 2..done (budget_mark: the end of epoch 1).
    if done == 1:
        epoch_s, t.budget_mark = now - t.budget.setup_s, now
    else:
        epoch_s = (now - t.budget_mark) / (done - 1)
    (elapsed, epoch_s) = D.all_reduce_sum([now, epoch_s], t.info, t.ex.device)
    world = t.info.world_size
    epochs = replan(t, t.budget, elapsed / world, epoch_s / world, done)
    if epochs != t.epochs:
        follow_plan(t, epochs)


def check_splits(cfg: TrainConfig, source: Any) -> None:
    """Before any epoch: with no val images no epoch can be scored, and no checkpoint chosen."""
    for split, fix in (("train", "smaller --val / --test fractions"), ("val", "a larger --val fraction (e.g. 0.15)")):
        if len(source.labels(split)) == 0:
            raise ConfigError(f"{cfg.pack}: the {split} split is empty; re-pack with {fix}")


def restore(t: Trainer) -> None:
    """--resume: weights, optimizer, schedule, scaler, EMA, this rank's RNGs and the progress."""
    state = load_checkpoint(t.run.last)
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    # No scheduler state: the LR is lr_at(step) of the plan, and the step follows from the epoch.
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None and state.get("ema"):
        t.ema.load_state_dict(state["ema"])
    rngs = state["rng"]
    set_rng_state(rngs[t.info.rank] if t.info.rank < len(rngs) else rngs[0])
    t.progress = Progress(epoch=int(state["epoch"]), best=float(state["best"]["metric"]),
                          best_epoch=int(state["best"]["epoch"]), since_best=int(state["epochs_since_best"]))
    t.say(f"resuming {t.run.path} after epoch {t.progress.epoch}")


def write_run_files(t: Trainer) -> None:
    """config.json, env.json; on resume, metrics.jsonl cut back to the checkpoint's epoch."""

    t.run.write_config(t.cfg)
    t.run.write_env({**hardware(), **t.ex.record(), "world_size": t.info.world_size,
                     "deterministic": t.opts.deterministic, "prefetch": bool(t.opts.prefetch),
                     # eval checks against it that a pack's test split holds no training images
                     "pack_fingerprint": getattr(t.source, "fingerprint", None)})
    if t.meta_schema is not None:  # --meta: how predict/serve/eval encode age, sex and site for this model
        atomic_write_text(t.run.metadata, json.dumps(t.meta_schema.record(), indent=2) + "\n")
    if t.cfg.resume:
        t.progress.rows = t.run.truncate_metrics(t.progress.epoch)


def meta_schema_of(cfg: TrainConfig, source: Any) -> Any:
    """--meta: the pack's metadata encoding (a resumed run keeps the one it started with)."""

    if not cfg.meta:
        return None
    saved = RunDir(cfg.out).metadata
    if cfg.resume and saved.is_file():
        return MetaSchema.from_record(json.loads(saved.read_text(encoding="utf-8")))
    pack = getattr(source, "pack", None)
    if pack is None:
        raise ConfigError("--meta reads the metadata stored in a pack: train on a pack (--pack DIR)")
    return pack.meta_schema()


def build_step(t: Trainer) -> TrainStep:
    """DDP wrapper (gradients all-reduced in buckets during backward), then torch.compile."""
    train_model: nn.Module = D.wrap_ddp(t.model, t.info, t.ex.device)  # t.model itself on one process
    compiled = torch.compile(train_model) if t.ex.compile else train_model
    criterion = build_criterion(t.cfg, t.source.labels("train"), len(t.classes)).to(t.ex.device)
    return TrainStep(compiled, train_model, t.optimizer, criterion, t.ex.device, t.ex.amp_dtype,
                     t.scaler, t.cfg.grad_clip, t.ema)


# ---------------------------------------------------------------- one epoch

def train_one_epoch(t: Trainer, epoch: int, display: LiveDisplay, stop: StopRequest,
                    sync_every: int = 20) -> EpochResult:
    """At most steps_per_epoch steps. Stops early (interrupted=True) at a step boundary when a stop
    is requested on any rank. Loss is summed on the device: no host sync per step."""
    cfg, info, device = t.cfg, t.info, t.ex.device
    t.train_loader.set_epoch(epoch)
    # A background thread can overlap batch assembly with compute for a loader that builds batches in
    # the calling thread. The shipped loaders already run ahead, and on 2 cores the extra thread only
    # competed with the step (bench train), so it is opt-in. Never in deterministic mode: a thread
    # drawing from the global RNG concurrently with dropout makes the order racy.
    prefetch = bool(t.opts.prefetch) and not t.opts.deterministic
    batches: Iterable = ThreadPrefetcher(t.train_loader) if prefetch else t.train_loader
    total = t.steps_per_epoch
    first = epoch == t.progress.epoch  # first epoch of this process: compile / warm-up steps
    meter = EpochMeter(warmup_steps=min(3, total - 1) if first else 0)
    display.start_epoch(f"epoch {epoch + 1}/{t.epochs}", total)
    t.step.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n, last_loss, interrupted, budget_stop = 0, None, False, False
    side = size_for_epoch(epoch, t.epochs, cfg.progressive_min_size, cfg.size, cfg.progressive_end)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    it = iter(batches)
    while n < total:
        try:
            images, labels, *meta = next(it)  # images N x 3 x S x S on the device, labels N (int64)
        except StopIteration:
            break
        except Exception:
            # Ctrl-C reaches the whole process group: loader workers may die before this process
            # reaches its step boundary. With a stop requested that is the interruption, not an error.
            if stop():
                interrupted = True
                break
            raise
        t1 = time.perf_counter()
        if n == 0:
            # The global RNGs (dropout, ...) restart from (seed, epoch, rank) once the first batch is in
            # hand: a loader may draw from them when its iterator starts (DataLoader's base seed, once
            # per process with persistent workers), which a resumed process does at a different epoch
            # than an uninterrupted one. Seeding after that draw makes resume exact.
            seed_all((cfg.seed + 1) * 1_000_003 + epoch * 1009 + info.rank)
        images = resize_batch(images, side)  # progressive resizing (a no-op at the loader's size)
        if meta:  # --meta: [N, M]; whole fields blanked at random (metadata dropout)
            meta = [drop_fields(meta[0], t.meta_schema, cfg.meta_dropout)]
        set_lr(t.optimizer, t.base_lrs, lr_at(epoch * total + n, cfg, t.epochs, total))  # before the step
        loss_sum += t.step(images, labels, *meta)
        n += 1
        fire("train.step", epoch=epoch + 1, step=n)
        if cuda and (n % sync_every == 0 or n <= meter.warmup_steps):
            torch.cuda.synchronize(device)  # per-step times between syncs are launch times
        t2 = time.perf_counter()
        meter.record(t1 - t0, t2 - t1, images.shape[0])
        if n % sync_every == 0 or n == total:
            last_loss = float(loss_sum) / n  # one host sync per sync_every steps
        display.update(n, meter, last_loss)
        # Stop requests are checked together on all ranks so that DDP never waits on a rank that left.
        # Never in the first epoch: without a finished epoch there is no checkpoint to test.
        over = t.budget is not None and epoch > 0 and t.budget.expired()
        # Under DDP any_rank is an all-reduce read on the host: a sync, so only every sync_every steps.
        if (not info.enabled or n % sync_every == 0) and D.any_rank(stop() or over, info, device):
            budget_stop = not stop()
            interrupted = n < total and not budget_stop
            break
        t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
    loss_total, count = D.all_reduce_sum([float(loss_sum), float(n)], info, device)
    return EpochResult(loss=loss_total / max(1.0, count), steps=n, interrupted=interrupted,
                       timing=meter.summary(), train_size=side, budget_stop=budget_stop)


# ---------------------------------------------------------------- validation

@torch.no_grad()
def collect_predictions(model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None,
            max_steps: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels [N], probabilities [N, C] (float64) and the summed cross-entropy of one pass."""
    model.eval()
    labels_all, probs_all = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (images, labels, *meta) in enumerate(batches):
        if max_steps and i >= max_steps:
            break
        with autocast(device, amp_dtype):
            logits = model(images, *meta).float()  # N x C
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        probs_all.append(torch.softmax(logits, 1).double().cpu().numpy())
        labels_all.append(labels.cpu().numpy())
    y = np.concatenate(labels_all) if labels_all else np.zeros(0, np.int64)
    p = np.concatenate(probs_all) if probs_all else np.zeros((0, len(CLASSES)))
    return y, p, float(loss_sum)


def evaluate(model: nn.Module, batches: Iterable, ex: Execution, info: D.DistInfo,
             classes: tuple[str, ...] = CLASSES, max_steps: int = 0) -> dict[str, Any]:
    """Validation during training, in the training precision. Every rank scores its shard; the
    probabilities are gathered so that AUC and balanced accuracy cover the whole split."""

    y, p, loss_sum = collect_predictions(model, batches, ex.device, ex.amp_dtype, max_steps)
    y, p = D.gather_arrays([y, p], info)
    (loss_total,) = D.all_reduce_sum([loss_sum], info, ex.device)
    m = classification_metrics(y, p, classes)
    return {"loss": loss_total / max(1, len(y)), "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"], "macro_auc": m["macro_auc"], "n": int(len(y)),
            "full": m}


# ---------------------------------------------------------------- save

def save(t: Trainer, epoch: int, res: EpochResult, val: dict[str, Any], display: LiveDisplay) -> None:
    """The epoch's metrics line, best.pt when it improved, last.pt (for resume), the curves."""
    from hamengine.engine.train.plots_train import plot_curves  # lazy: matplotlib only when a figure is drawn

    first = epoch == t.progress.epoch
    if first:
        t.warmup_s = res.timing["warmup_s"]
    t.progress.epoch = epoch + 1
    improved = t.progress.improve(val["balanced_accuracy"])
    timing = res.timing
    row = {"epoch": t.progress.epoch, "lr": t.optimizer.param_groups[0]["lr"], "train_loss": res.loss,
           "val_loss": val["loss"], "val_accuracy": val["accuracy"],
           "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_auc": val["macro_auc"],
           "val_n": val["n"], "img_per_s": timing["img_per_s"], "data_ms": timing["data_ms"],
           "step_ms": timing["step_ms"], "data_fraction": timing["data_fraction"], "epoch_s": timing["wall_s"],
           "warmup_s": timing["warmup_s"] if first else 0.0, "best": improved, "train_size": res.train_size,
           "val_s": val.get("seconds", 0.0), "elapsed_s": time.perf_counter() - t.started}
    rngs = D.gather_objects(rng_state(), t.info)  # every rank's RNG, for an exact resume
    if t.info.is_main:
        p, cfg = t.progress, t.cfg
        p.rows.append(row)
        t.run.append_metrics(row)  # before last.pt: a resume drops lines past the checkpoint
        meta = {"epoch": p.epoch, "config": to_dict(cfg), "classes": list(t.classes), "model_name": cfg.model}
        if improved:
            save_checkpoint({**meta, "model": t.eval_model.state_dict(), "metrics": row}, t.run.best)
        save_checkpoint({**meta, "model": unwrap(t.model).state_dict(),
                         "ema": t.ema.state_dict() if t.ema else None,
                         "optimizer": t.optimizer.state_dict(),
                         "scaler": t.scaler.state_dict() if t.scaler else None, "rng": rngs,
                         "best": {"metric": p.best, "epoch": p.best_epoch},
                         "epochs_since_best": p.since_best, "metrics": row}, t.run.last)
        plot_curves(p.rows, t.run.plots / "curves.png", title=f"{cfg.model} — {t.run.path.name}")
        auc = "n/a" if val["macro_auc"] is None else f"{val['macro_auc']:.3f}"
        display.log(
            f"epoch {p.epoch:>3}/{t.epochs}  loss {res.loss:.3f}  val loss {val['loss']:.3f}  "
            f"acc {val['accuracy']:.3f}  bal acc {val['balanced_accuracy']:.3f}  auc {auc}  "
            f"{timing['img_per_s']:.0f} img/s  data {timing['data_ms']:.0f} ms / step {timing['step_ms']:.0f} ms"
            f"{'  *best*' if improved else ''}")
    D.barrier(t.info)


# ---------------------------------------------------------------- the end

def summarize(t: Trainer, interrupted: bool) -> dict[str, Any]:
    p = t.progress
    return {"run": str(t.run.path), "epochs": p.epoch, "best_epoch": p.best_epoch,
            "best_val_balanced_accuracy": p.best if p.best >= 0 else None, "interrupted": interrupted,
            "warmup_s": t.warmup_s, "compile_failed": t.step.compile_failed}


def explain_interrupt(t: Trainer, signum: int | None) -> None:
    if t.run.last.exists():
        t.say(f"[yellow]interrupted[/] (signal {signum}): {t.run.last} holds epoch {t.progress.epoch}; "
              f"continue with --resume --out {t.run.path}")
    else:  # stopped inside the first epoch: nothing to resume from
        t.say(f"[yellow]interrupted[/] (signal {signum}) before the first epoch ended: no checkpoint was "
              f"written; run the same command again (without --resume) to start over")


def test_evaluation(t: Trainer) -> dict[str, Any]:
    """The run's judged weights (cfg.checkpoint: best or last) on the test split through `evaluate_run`,
    exactly as `hamengine eval` scores them (same metrics.json, predictions, ISIC files and figures in
    RUN/eval-test/)."""

    start = time.perf_counter()
    # --decision val-bias: per-class biases are fitted on val predictions of the same weights (same
    # TTA), saved in RUN/calibration.json, then applied to the test predictions (eval --fit-bias).
    fit_bias = Decision(t.cfg.decision) == Decision.VAL_BIAS
    m = evaluate_run(t.run.path, EvalOptions(split="test", checkpoint=t.cfg.checkpoint, tta=t.cfg.test_tta,
                                             loader=t.cfg.loader, fit_bias=fit_bias,
                                             batch_size=t.cfg.batch_size,
                                             workers=t.cfg.workers, device=str(t.ex.device)),
                     progress=t.opts.console.is_terminal)
    test = {k: m[k] for k in ("balanced_accuracy", "accuracy", "macro_auc", "n")}
    test["checkpoint"], test["tta"] = m["eval"]["checkpoint"], m["eval"]["tta"]
    test["per_class_recall"] = {k: v["recall"] for k, v in m["per_class"].items()}
    return {"test": test, "test_eval_s": time.perf_counter() - start}
