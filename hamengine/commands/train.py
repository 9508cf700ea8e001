"""`hamengine models`, `hamengine train`, `hamengine demo`: parse options, delegate to the engine."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.table import Table

from hamengine.commands.common import config_options, console, emit_json, err_console
from hamengine.config import (
    DemoConfig,
    OnResume,
    TrainConfig,
    from_dict,
    load_config_file,
    resume_conflicts,
    to_dict,
)
from hamengine.engine.runtime.run import RunDir
from hamengine.errors import ConfigError
from hamengine.recipes import apply_recipe


@click.command()
@click.option("--size", default=224, show_default=True, help="Input side in pixels for the GFLOPs count.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(size: int, as_json: bool) -> None:
    """List the registered models with parameter count and GFLOPs (one image at --size)."""
    from hamengine.models import list_models, model_info  # lazy: torch (--help stays fast)

    infos = [model_info(n, size) for n in list_models()]
    if as_json:
        emit_json(infos)
        return

    table = Table(title=f"models (GFLOPs at {size}x{size}, 2 FLOPs per multiply-add)")
    for col in ("name", "params", "GFLOPs", "description"):
        table.add_column(col, justify="right" if col in ("params", "GFLOPs") else "left")
    for i in infos:
        table.add_row(i["name"], f"{i['params'] / 1e6:.2f} M", f"{i['gflops']:.2f}", i["description"])
    console.print(table)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
OPTION_FIELDS = tuple(name for name, f in _FIELDS.items() if "help" in f.metadata)


def resolve_config(ctx: click.Context, params: dict[str, Any]) -> TrainConfig:
    """TrainConfig defaults < recipe (--recipe, or `recipe` in the file) < saved run config (on
    --resume: it holds every resolved value) < --config file < flags given on the command line."""

    given = [k for k in OPTION_FIELDS
             if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    file_data = load_config_file(params["config"]) if params["config"] else {}
    out = params["out"] if "out" in given else file_data.get("out", TrainConfig.out)
    saved = _saved_config(out) if params["resume"] else None
    data: dict[str, Any] = {**(to_dict(saved) if saved else {}), **file_data}
    for k in given:
        sub = _FIELDS[k].metadata["sub"]
        data[k] = {**data.get(k, {}), sub: params[k]} if sub else params[k]
    recipe = params["recipe"] if "recipe" in given else data.get("recipe", TrainConfig.recipe)
    data = apply_recipe(recipe, data)
    cfg = from_dict(TrainConfig, data, where=params["config"] or "options")
    if not cfg.pack:
        raise ConfigError("--pack is required (or `pack` in the --config file)")
    cfg.pack = str(Path(cfg.pack).resolve())  # the run is evaluated later from any directory
    if saved is not None:
        check_resume(RunDir(out), saved, cfg)
    return cfg


def _saved_config(out: str) -> TrainConfig | None:
    """The config.json of the run to resume; None when there is no run there (fit says so)."""


    run = RunDir(out)
    if not run.config_path.is_file():
        if run.last.is_file():
            raise ConfigError(f"--resume: {run.config_path} is missing, so the run's settings are unknown; "
                              f"restore it, or start a new run in another --out")
        return None
    try:
        data = json.loads(run.config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ConfigError(f"--resume: {run.config_path} cannot be read ({e}); restore it, or start a new run "
                          f"in another --out") from None
    return from_dict(TrainConfig, data, where=str(run.config_path))


def check_resume(run: RunDir, saved: TrainConfig, cfg: TrainConfig) -> None:
    """Before fit rewrites config.json: a resumed run keeps its recipe. Only what OnResume allows
    may differ from the saved config (epochs only upwards, a moved pack only if it is the same)."""
    conflicts = resume_conflicts(saved, cfg)
    problems = []
    fixed = [str(c) for c in conflicts if c.rule == OnResume.FIXED]
    if fixed:
        problems.append(f"the run in {run.path} was trained with {', '.join(fixed)}; these cannot change on "
                        f"resume (drop them, or start a new run in another --out)")
    if any(c.rule == OnResume.EXTEND for c in conflicts):
        problems.append(f"--epochs {cfg.epochs} is not above the run's {saved.epochs} (config.json): resume "
                        f"can only raise --epochs to extend a run, since fewer epochs would change its LR "
                        f"schedule midway; to stop here, use the run's checkpoints as they are (`hamengine eval "
                        f"{run.path} --checkpoint last`), or start a new run in another --out")
    if Path(cfg.pack) != Path(saved.pack):
        problems += _moved_pack_problem(run, saved, cfg)
    if problems:
        raise ConfigError("--resume: " + "; ".join(problems))


def _moved_pack_problem(run: RunDir, saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """A --pack other than the saved path is fine when it is the same pack, moved (same fingerprint)."""
    from hamengine.loaders.pack.records import Pack  # lazy: torch (--help stays fast)

    recorded = (run.read_env() or {}).get("pack_fingerprint")
    if recorded is None or Pack(cfg.pack, check_files=False).fingerprint == recorded:
        return []
    return [f"--pack {cfg.pack} is not the pack the run was trained on ({saved.pack}, fingerprint "
            f"{recorded[:12]}); resume with that pack, or start a new run in another --out"]


@click.command(context_settings={"show_default": True})
@config_options(TrainConfig)
@click.option("--config", type=click.Path(), default=None,
              help="JSON/TOML file of TrainConfig keys; flags given explicitly override it.")
@click.option("--deterministic", is_flag=True,
              help="Deterministic algorithms, no prefetch thread: bit-exact reruns and resumes on CPU (slower).")
@click.option("--prefetch/--no-prefetch", default=None,
              help="Background-thread batch prefetch [default: off; the loaders already run ahead].")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.pass_context
def train(ctx: click.Context, **params: Any) -> None:
    """Train a model on a pack into a run directory (config.json, metrics.jsonl, checkpoints/,
    plots/, eval-test/). Under torchrun each process trains a shard (DDP)."""
    from hamengine.engine.train.trainer import (  # lazy: torch (--help stays fast)
        FitOptions,
        fit,
    )

    cfg = resolve_config(ctx, params)
    # With --json, stdout carries only the JSON: progress and epoch lines go to stderr.
    summary = fit(cfg, FitOptions(deterministic=params["deterministic"], prefetch=params["prefetch"],
                                  console=err_console if params["as_json"] else console))
    report(summary, params["as_json"])
    if summary.get("interrupted"):
        ctx.exit(130)


def report(summary: dict, as_json: bool) -> None:

    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        emit_json(summary)
        return
    test = summary.get("test")
    if not test:
        return

    which = (f"best checkpoint (epoch {summary['best_epoch']})" if test.get("checkpoint") == "best.pt"
             else f"final weights (epoch {summary['epochs']})")
    tta = f", TTA {test['tta']}" if test.get("tta") not in (None, "none") else ""
    table = Table(title=f"test split, {which}{tta}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("balanced_accuracy", "accuracy", "macro_auc"):
        table.add_row(k.replace("_", " "), "n/a" if test[k] is None else f"{test[k]:.3f}")
    for dx, r in test["per_class_recall"].items():
        table.add_row(f"recall {dx}", "n/a" if r is None else f"{r:.3f}")
    console.print(table)
    console.print(f"run: {summary['run']}")


@click.command()
@config_options(DemoConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary (timings, metrics, run) as JSON.")
def demo(as_json: bool, **options: Any) -> None:
    """End to end on CPU in a few minutes: synthesize HAM10000-like images, pack them, train
    hamnet (precision and memory format as measured on this host: bf16 where the CPU runs it
    natively, fp32 where bf16 is emulated), evaluate the test split, print the metrics and the run path."""
    from hamengine.engine.demo import run_demo  # lazy: torch (--help stays fast)

    cfg = DemoConfig(**options)
    summary = run_demo(cfg, console=err_console if as_json else console)
    report(summary["train"], as_json=False) if not as_json else emit_json(summary)
    if not as_json:
        console.print(f"demo done in {summary['seconds']['total']:.0f} s "
                      f"(synth {summary['seconds']['synth']:.0f}, pack {summary['seconds']['pack']:.0f}, "
                      f"train+eval {summary['seconds']['train']:.0f})")
