"""`hamengine models`, `hamengine train`, `hamengine demo`: parse options, delegate to the engine."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from hamengine.commands.common import console, emit_json, err_console, fail
from hamengine.config import (
    AugPreset,
    Balance,
    CompileMode,
    LoaderKind,
    Optimizer,
    Precision,
    Schedule,
    TrainConfig,
)

_D = TrainConfig()


@click.command()
@click.option("--size", default=224, show_default=True, help="Input side in pixels for the GFLOPs count.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(size: int, as_json: bool) -> None:
    """List the registered models with parameter count and GFLOPs (one image at --size)."""
    from hamengine.models import list_models, model_info

    infos = [model_info(n, size) for n in list_models()]
    if as_json:
        emit_json(infos)
        return
    from rich.table import Table

    table = Table(title=f"models (GFLOPs at {size}x{size}, 2 FLOPs per multiply-add)")
    for col in ("name", "params", "GFLOPs", "description"):
        table.add_column(col, justify="right" if col in ("params", "GFLOPs") else "left")
    for i in infos:
        table.add_row(i["name"], f"{i['params'] / 1e6:.2f} M", f"{i['gflops']:.2f}", i["description"])
    console.print(table)


# Option name -> TrainConfig key for the flags that map one-to-one.
_FLAG_KEYS = ("pack", "model", "epochs", "batch_size", "size", "lr", "weight_decay", "optimizer",
              "schedule", "warmup_epochs", "label_smoothing", "balance", "amp", "amp_dtype",
              "channels_last", "compile", "ema", "grad_clip", "loader", "seed", "out", "resume",
              "early_stop", "device", "pretrained", "pretrained_path", "workers", "max_steps_per_epoch")


def _choice(enum) -> click.Choice:
    return click.Choice([m.value for m in enum])


def resolve_config(ctx: click.Context, params: dict[str, Any]) -> TrainConfig:
    """Saved run config (on --resume) < --config file < flags given on the command line."""
    import json

    from hamengine.config import ConfigError, from_dict, load_config_file

    data: dict[str, Any] = {}
    given = {k for k in _FLAG_KEYS + ("aug",)
             if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    out = params["out"] if "out" in given else None
    if params["config"]:
        file_data = load_config_file(params["config"])
        out = out or file_data.get("out")
    else:
        file_data = {}
    if params["resume"]:
        saved = Path(out or _D.out) / "config.json"
        if not saved.is_file() and (saved.parent / "checkpoints" / "last.pt").is_file():
            raise ConfigError(f"--resume: {saved} is missing, so the run's settings are unknown; restore "
                              f"it, or start a new run in another --out")
        try:
            if saved.is_file():  # else: no run here; the run folder check says so
                data.update(json.loads(saved.read_text(encoding="utf-8")))
        except (ValueError, OSError) as e:
            raise ConfigError(f"--resume: {saved} cannot be read ({e}); restore it, or start a new run "
                              f"in another --out") from None
        fixed = [k for k in ("model", "optimizer") if k in given and params[k] != data.get(k)]
        if fixed:
            raise ConfigError(f"--resume: the run in {saved.parent} was trained with " + ", ".join(
                f"--{k} {data.get(k)}" for k in fixed) + "; these cannot change on resume (drop the flag, "
                "or start a new run in another --out)")
    data.update(file_data)
    for k in given:
        if k == "aug":
            data["aug"] = {**data.get("aug", {}), "preset": params["aug"]}
        else:
            data[k] = params[k]
    cfg = from_dict(TrainConfig, data, where=params["config"] or "options")
    if not cfg.pack:
        raise click.UsageError("--pack is required (or `pack` in the --config file)")
    cfg.pack = str(Path(cfg.pack).resolve())  # the run is evaluated later from any directory
    return cfg


@click.command(context_settings={"show_default": True})
@click.option("--pack", type=click.Path(), help="Pack folder (hamengine pack) to train on.")
@click.option("--model", default=_D.model, help="Model name (see `hamengine models`).")
@click.option("--epochs", type=int, default=_D.epochs, help="Number of epochs.")
@click.option("--batch-size", type=int, default=_D.batch_size, help="Batch size per process.")
@click.option("--size", type=int, default=_D.size, help="Input side S in pixels (S x S crops).")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 2e-3 x sqrt(batch/128) "
              "for AdamW, 0.1 x batch/256 for SGD; a quarter of that with pretrained weights].")
@click.option("--weight-decay", type=float, default=_D.weight_decay,
              help="Weight decay (not on norms/biases) [default: 0.05 with adamw, 1e-4 with sgd].")
@click.option("--optimizer", type=_choice(Optimizer), default=_D.optimizer.value, help="Optimizer.")
@click.option("--schedule", type=_choice(Schedule), default=_D.schedule.value,
              help="LR schedule after the linear warm-up.")
@click.option("--warmup-epochs", type=float, default=_D.warmup_epochs, help="Linear LR warm-up epochs.")
@click.option("--label-smoothing", type=float, default=_D.label_smoothing, help="Label smoothing.")
@click.option("--balance", type=_choice(Balance), default=_D.balance.value,
              help="Class balance: none, class-balanced sampler, or inverse-frequency loss weights.")
@click.option("--amp/--no-amp", default=_D.amp, help="Mixed precision autocast (bf16 by default).")
@click.option("--amp-dtype", type=_choice(Precision), default=_D.amp_dtype.value,
              help="Autocast dtype: bf16 (CPU, recent GPUs) or fp16 (with a GradScaler).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Memory format [default: channels_last on CUDA, NCHW on CPU (faster with bf16 there)].")
@click.option("--compile", type=_choice(CompileMode), default=_D.compile.value,
              help="torch.compile: auto = on with CUDA, off on CPU; failure falls back to eager.")
@click.option("--ema", type=float, default=None, help="EMA decay of the weights (e.g. 0.999); off if unset.")
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--loader", type=_choice(LoaderKind), default=_D.loader.value, help="Data loader kind.")
@click.option("--aug", type=_choice(AugPreset), default=_D.aug.preset.value, help="Train augmentation preset.")
@click.option("--workers", type=int, default=_D.workers, help="Loader workers/threads (0 = all cores).")
@click.option("--seed", type=int, default=_D.seed, help="Random seed.")
@click.option("--out", type=click.Path(), default=_D.out, help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoints/last.pt "
              "(its config.json is the base; flags given override it, e.g. --epochs to extend).")
@click.option("--config", type=click.Path(), default=None,
              help="JSON/TOML file of TrainConfig keys; flags given explicitly override it.")
@click.option("--early-stop", type=int, default=_D.early_stop,
              help="Stop after N epochs without a val balanced-accuracy gain (0 = off).")
@click.option("--device", default=_D.device, help="auto, cpu or cuda.")
@click.option("--pretrained/--no-pretrained", default=_D.pretrained,
              help="Start from torchvision ImageNet weights (TORCH_HOME cache).")
@click.option("--pretrained-path", type=click.Path(), default=None,
              help="Start from a local weights file (state dict or hamengine checkpoint).")
@click.option("--max-steps-per-epoch", type=int, default=_D.max_steps_per_epoch,
              help="Cap the steps of each epoch (smoke tests; 0 = whole epoch).")
@click.option("--deterministic", is_flag=True,
              help="Deterministic algorithms, no prefetch thread: bit-exact reruns and resumes on CPU (slower).")
@click.option("--prefetch/--no-prefetch", default=None,
              help="Background-thread batch prefetch [default: off; the loaders already run ahead].")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.pass_context
def train(ctx: click.Context, **params: Any) -> None:
    """Train a model on a pack into a run directory (config.json, metrics.jsonl, checkpoints/,
    plots/, eval-test/). Under torchrun each process trains a shard (DDP)."""
    from hamengine.config import ConfigError

    try:
        cfg = resolve_config(ctx, params)
    except ConfigError as e:
        fail(str(e))
    # With --json, stdout carries only the JSON: progress and epoch lines go to stderr.
    summary = run_training(cfg, deterministic=params["deterministic"], prefetch=params["prefetch"],
                           out=err_console if params["as_json"] else console)
    report(summary, params["as_json"])
    if summary.get("interrupted"):
        ctx.exit(130)


def run_training(cfg: TrainConfig, deterministic: bool = False, prefetch: bool | None = None,
                 out=console) -> dict:
    """fit() with every user-caused error turned into one clear message."""
    from hamengine.config import ConfigError
    from hamengine.engine.checkpoint import CheckpointError
    from hamengine.engine.run import RunError
    from hamengine.engine.train import FitOptions, fit
    from hamengine.loaders.records import PackError
    from hamengine.models import PretrainedError

    try:
        return fit(cfg, FitOptions(deterministic=deterministic, prefetch=prefetch, console=out))
    except (PackError, RunError, CheckpointError, PretrainedError, ConfigError) as e:
        fail(str(e))
    except ValueError as e:  # unknown model, bad device, batch larger than the split
        fail(str(e))


def report(summary: dict, as_json: bool) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        emit_json(summary)
        return
    test = summary.get("test")
    if not test:
        return
    from rich.table import Table

    table = Table(title=f"test split, best checkpoint (epoch {summary['best_epoch']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("balanced_accuracy", "accuracy", "macro_auc"):
        table.add_row(k.replace("_", " "), "n/a" if test[k] is None else f"{test[k]:.3f}")
    for dx, r in test["per_class_recall"].items():
        table.add_row(f"recall {dx}", "n/a" if r is None else f"{r:.3f}")
    console.print(table)
    console.print(f"run: {summary['run']}")


@click.command()
@click.option("--workdir", type=click.Path(), default="demo-data", show_default=True,
              help="Folder for the synthetic data, the pack and the run (reused when run again).")
@click.option("--n", type=int, default=2000, show_default=True, help="Synthetic images to generate.")
@click.option("--epochs", type=int, default=None, help="Training epochs [default: the demo's tuned value].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for data and training.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (timings, metrics, run) as JSON.")
def demo(workdir: str, n: int, epochs: int | None, seed: int, as_json: bool) -> None:
    """End to end on CPU in a few minutes: synthesize HAM10000-like images, pack them, train
    hamnet (bf16), evaluate the test split, print the metrics table and the run path."""
    from hamengine.engine.demo import DemoConfig, run_demo

    cfg = DemoConfig(workdir=workdir, n=n, seed=seed)
    if epochs is not None:
        cfg.epochs = epochs
    from hamengine.loaders.records import PackError
    from hamengine.loaders.synth import SynthError

    try:
        summary = run_demo(cfg, console=err_console if as_json else console)
    except (SynthError, PackError, OSError, ValueError) as e:  # e.g. a --workdir holding other files
        fail(f"demo: {e}")
    report(summary["train"], as_json=False) if not as_json else emit_json(summary)
    if not as_json:
        console.print(f"demo done in {summary['seconds']['total']:.0f} s "
                      f"(synth {summary['seconds']['synth']:.0f}, pack {summary['seconds']['pack']:.0f}, "
                      f"train+eval {summary['seconds']['train']:.0f})")
