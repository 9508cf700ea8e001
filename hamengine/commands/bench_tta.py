"""`hamengine bench tta`: parse options, call hamengine.bench.tta, print a table or JSON.
Added to the `bench` group by hamengine/commands/bench.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from hamengine.commands.common import command_line, console, emit_json, err_console, int_list, say
from hamengine.errors import ConfigError


def _float_list(option: str, text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated numbers such as 0.5,0.6,0.7") from None


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _fraction(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


@click.command("tta")
@click.option("--pack", required=True, type=click.Path(file_okay=False), help="The pack every recipe trains on.")
@click.option("--recipes", default="baseline,fast", show_default=True,
              help="Comma-separated recipes (hamengine/recipes.py: default, fast, baseline).")
@click.option("--budget", default="20m", show_default=True,
              help="Wall-clock budget of each run (e.g. 90s, 20m, 1h); fit plans its epochs to end inside it.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds; each recipe runs once per seed.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the runs (OUT/<recipe>-s<seed>), tta.json and tta.png.")
@click.option("--source", type=click.Path(exists=True, file_okay=False),
              help="The ORIGINAL HAM10000 folder the pack was built from: the baseline recipe trains from it "
                   "through the per-file folder loader (required with baseline).")
@click.option("--targets", default="0.5,0.6,0.7", show_default=True,
              help="Comma-separated val balanced-accuracy targets.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--model", default=None, help="Override the model of every recipe (e.g. a small one for a smoke run).")
@click.option("--size", default=None, type=int, help="Override the training side of every recipe.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def bench_tta(pack: str, recipes: str, budget: str, seeds: str, out: str, source: str | None, targets: str,
              device: str, model: str | None, size: int | None, as_json: bool) -> None:
    """Train each recipe x seed under the same --budget; report the train-clock seconds (per-epoch
    validation excluded) to each val balanced-accuracy target, the best val and the final test
    balanced accuracy (lesion-bootstrap 95% CI). Writes OUT/tta.json and OUT/tta.png."""
    from hamengine.bench.tta import (  # lazy: torch (--help stays fast)
        TTASpec,
        run_bench_tta,
    )

    overrides: dict[str, Any] = {}
    if model:
        overrides["model"] = model
    if size:
        overrides["size"] = size  # a recipe's progressive floor at or above it is dropped (apply_recipe)
    spec = TTASpec(pack=pack, out=out, budget=budget, recipes=[r.strip() for r in recipes.split(",") if r.strip()],
                   seeds=int_list("--seeds", seeds), targets=_float_list("--targets", targets), source=source,
                   device=device, overrides=overrides)
    # Progress lines go to stderr with --json (stdout is the JSON); fit's own display only without it.
    result = run_bench_tta(spec, log=(lambda m: err_console.print(m, highlight=False)) if as_json else say(False),
                           console=err_console if as_json else console, command=command_line())
    if as_json:
        emit_json(result)
        return
    _table(result)
    if not result["complete"]:
        console.print("[yellow]interrupted[/]: the table holds the runs that finished before it", highlight=False)
    console.print(f"clock: {result['clock']} (validation seconds in the eval s column); wrote "
                  f"{Path(out) / 'tta.json'} and {result['plot']}", highlight=False)


def _table(result: dict[str, Any]) -> None:

    keys = [f"{t:g}" for t in result["targets"]]
    t = Table(title=f"time to val balanced accuracy, budget {result['budget_s']:.0f} s ({result['clock']})")
    for col in ("recipe", "seed", "loader", "epochs", "img/s", "eval s", *[f"t@{k} (s)" for k in keys],
                "best val", "test bal acc (95% CI)"):
        t.add_column(col, justify="right")
    for r in result["runs"]:
        if r["error"]:
            t.add_row(r["recipe"], str(r["seed"]), r["loader"] or "-", "[red]failed[/] (below)")
            continue
        ci = r["test_balanced_accuracy_ci"]
        test = _fraction(r["test_balanced_accuracy"]) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci else "")
        t.add_row(r["recipe"], str(r["seed"]), r["loader"] or "-", str(r["epochs"]),
                  "-" if r["img_per_s"] is None else f"{r['img_per_s']:.0f}", _seconds(r["eval_s"]),
                  *[_seconds(r["time_to_target"][k]) for k in keys],
                  _fraction(r["best_val_balanced_accuracy"]), test)
    for name, m in result["recipes"].items():
        t.add_row(f"[bold]{name}[/]", f"mean of {m['seeds']}", "", _seconds(m["epochs"]),
                  "-" if m["img_per_s"] is None else f"{m['img_per_s']:.0f}", _seconds(m["eval_s"]),
                  *[f"{_seconds(m['time_to_target'][k])} ({m['reached'][k]}/{m['seeds']})" for k in keys],
                  _fraction(m["best_val_balanced_accuracy"]), _fraction(m["test_balanced_accuracy"]))
    console.print(t)
    for name, v in result.get("versus_baseline", {}).items():
        per_seed = "; ".join(
            f"seed {s['seed']} {_seconds(s['recipe_s'])} s vs {s['baseline_s']:.1f} s"
            + ("" if s["time_ratio"] is None else f" ({s['time_ratio']:.2f}x)") for s in v["seeds"])
        ratio = "-" if v["time_ratio"] is None else f"{v['time_ratio']:.2f}x"
        gain = "-" if v["test_gain"] is None else f"{v['test_gain']:+.3f}"
        console.print(f"[bold]{name} vs baseline[/]: time to the baseline's best val balanced accuracy: {per_seed}; "
                      f"mean {ratio} ({v['reached']}/{len(v['seeds'])} seeds reached it); test balanced accuracy "
                      f"{gain} (mean over seeds)", highlight=False)
    for r in result["runs"]:  # whole messages, below the table where they are not wrapped
        if r["error"]:
            console.print(f"[red]{r['recipe']} seed {r['seed']} failed:[/] {r['error']} (run folder {r['run']})",
                          highlight=False)
