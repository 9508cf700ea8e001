"""`hamengine bench tta`: time to a validation balanced accuracy (the DAWNBench / airbench figure).

For each recipe x seed, one real `fit` under the same --budget into OUT/<recipe>-s<seed>; then, from
its metrics.jsonl, the train-clock second at which val balanced accuracy first reached each target.

The clock: `elapsed_s` (wall seconds since fit started: setup, the budget probe and training) minus
the cumulative `val_s` of the epochs so far, so per-epoch validation is EXCLUDED (its total is
reported as eval_s). An accuracy is reached at the end of the epoch whose validation measured it.
The test score is the run's own end-of-training evaluation (RUN/eval-test/metrics.json, the same
`evaluate_run` path for every recipe) of the weights the recipe is judged by (best or last, with its
test TTA: `test_weights`), with its lesion-bootstrap 95% interval.

`versus_baseline` puts each recipe beside `baseline` seed by seed: the train-clock seconds it takes
to reach the baseline's best val balanced accuracy against the baseline's own time to it, and the
difference in test balanced accuracy. tta.json is rewritten after every run (`complete` false until
the last), so an interrupted bench keeps what it finished.

The `baseline` recipe trains through the per-file `folder` loader (PIL decode of the ORIGINAL
download, torchvision transforms): what a typical HAM10000 project does. Its test evaluation reads
the pack like every other recipe, so only the training pipeline differs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hamengine.config import LoaderKind, TrainConfig, from_dict, parse_duration
from hamengine.engine.runtime.environment import hardware
from hamengine.engine.runtime.run import RunDir
from hamengine.engine.train.data import PackSource
from hamengine.engine.train.trainer import FitOptions, fit
from hamengine.errors import ConfigError
from hamengine.fileio import atomic_write_text
from hamengine.recipes import RECIPES, apply_recipe

CLOCK = "train time, evaluation excluded"
BASELINE = "baseline"  # the recipe every other one is compared with (versus_baseline)
FOLDER_RECIPES = (BASELINE,)  # recipes that train through the per-file folder loader
DEFAULT_TARGETS = (0.5, 0.6, 0.7)


@dataclass
class TTASpec:
    """What `hamengine bench tta` was asked (checked by `check_spec`)."""

    pack: str
    out: str
    budget: str
    recipes: list[str] = field(default_factory=lambda: ["baseline", "fast"])
    seeds: list[int] = field(default_factory=lambda: [0])
    targets: list[float] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    source: str | None = None  # the original HAM10000 folder (the baseline's input)
    device: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys over every recipe


def target_key(target: float) -> str:
    """'0.5', '0.65': the JSON key of a target."""
    return f"{target:g}"


def check_spec(spec: TTASpec) -> float:
    """Refuse what cannot run before any training starts; returns the budget in seconds."""
    budget_s = parse_duration(spec.budget)  # ConfigError naming --budget
    unknown = [r for r in spec.recipes if r not in RECIPES]
    if unknown or not spec.recipes:
        raise ConfigError(f"--recipes {','.join(spec.recipes)!r}: unknown {', '.join(unknown) or '(none given)'}; "
                          f"known: {', '.join(RECIPES)}")
    if not spec.seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. 0 or 0,1,2")
    bad = [t for t in spec.targets if not 0.0 < t <= 1.0]
    if bad or not spec.targets:
        raise ConfigError(f"--targets: balanced-accuracy targets are in (0, 1], e.g. 0.5,0.6,0.7 (got {spec.targets})")
    if not (Path(spec.pack) / "manifest.json").is_file():
        raise ConfigError(f"--pack {spec.pack}: not a pack (no manifest.json); make one with `hamengine pack`")
    if any(r in FOLDER_RECIPES for r in spec.recipes):
        if not spec.source:
            raise ConfigError("the baseline recipe trains from the ORIGINAL HAM10000 download (one JPEG per image, "
                              "read by the per-file `folder` loader): pass --source DIR, the folder the pack was "
                              "built from (a pack records no paths), or leave baseline out of --recipes")
        if not Path(spec.source).is_dir():
            raise ConfigError(f"--source {spec.source}: not a folder (the original HAM10000 download)")
    for recipe in spec.recipes:
        for seed in spec.seeds:
            run = run_path(spec, recipe, seed)
            if RunDir(run).metrics_path.exists() or RunDir(run).last.exists():
                raise ConfigError(f"--out {spec.out}: {run} already holds a run; choose another --out")
    return budget_s


def run_path(spec: TTASpec, recipe: str, seed: int) -> Path:
    return Path(spec.out) / f"{recipe}-s{seed}"


# ---------------------------------------------------------------- metrics -> time to target

def time_to_targets(rows: Sequence[dict[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
    """From metrics.jsonl rows: the curve on the train clock, time to each target, totals.

    Train clock of an epoch = elapsed_s - (val_s of this and every earlier epoch); a target never
    reached is None. Rows without elapsed_s (older runs) fall back to the sum of epoch_s."""
    curve: list[list[float]] = []
    eval_s = 0.0
    fallback = 0.0
    for r in rows:
        eval_s += float(r.get("val_s") or 0.0)
        fallback += float(r.get("epoch_s") or 0.0)
        elapsed = r.get("elapsed_s")
        clock = float(elapsed) - eval_s if elapsed is not None else fallback
        curve.append([clock, float(r["val_balanced_accuracy"])])
    reached: dict[str, float | None] = {}
    for target in targets:
        reached[target_key(target)] = next((t for t, acc in curve if acc >= target), None)
    rates = [float(r["img_per_s"]) for r in rows if r.get("img_per_s")]
    return {"epochs": len(rows), "curve": curve, "time_to_target": reached, "eval_s": eval_s,
            "train_s": curve[-1][0] if curve else None,
            "best_val_balanced_accuracy": max((acc for _, acc in curve), default=None),
            "img_per_s": sum(rates) / len(rates) if rates else None}


def held_out_scores(eval_metrics: dict[str, Any] | None) -> tuple[float | None, list[float | None] | None]:
    """(balanced accuracy, its 95% lesion-bootstrap interval) from eval-test/metrics.json."""
    if not eval_metrics:
        return None, None
    ci = (eval_metrics.get("ci") or {}).get("balanced_accuracy")
    return eval_metrics.get("balanced_accuracy"), ci


# ---------------------------------------------------------------- the baseline's data source

class RecordingSource:
    """PackSource that records which loader kind fed each split; with `originals`, train and val
    come from the per-file `folder` loader over the original download (the baseline)."""

    def __init__(self, pack: str, originals: str | None = None):

        self.inner = PackSource(pack)
        self.originals = originals
        self.classes = self.inner.classes
        self.kinds: dict[str, str] = {}

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def labels(self, split: str):
        return self.inner.labels(split)

    def loader(self, split: str, cfg, device, rank: int = 0, world_size: int = 1):
        if self.originals:
            cfg = dataclasses.replace(cfg, kind=LoaderKind.FOLDER, source=self.originals)
        loader = self.inner.loader(split, cfg, device, rank, world_size)
        self.kinds[split] = str(getattr(loader, "kind", cfg.kind))
        return loader


# ---------------------------------------------------------------- runs

def build_config(spec: TTASpec, recipe: str, seed: int):

    data = {**spec.overrides, "pack": str(spec.pack), "out": str(run_path(spec, recipe, seed)),
            "budget": spec.budget, "seed": seed, "device": spec.device}
    return from_dict(TrainConfig, apply_recipe(recipe, data), where=f"recipe {recipe}")


def run_one(spec: TTASpec, recipe: str, seed: int, console=None) -> dict[str, Any]:
    """One fit; its TTA record. A failure is recorded (error) rather than raised."""

    run = RunDir(run_path(spec, recipe, seed))
    record: dict[str, Any] = {"recipe": recipe, "seed": seed, "run": str(run.path), "loader": None, "error": None,
                              "test_eval_s": None}
    source = None
    start = time.perf_counter()
    try:
        cfg = build_config(spec, recipe, seed)
        source = RecordingSource(cfg.pack, spec.source if recipe in FOLDER_RECIPES else None)
        # The command passes its console (stderr under --json); bench/ itself never builds one.
        opts = FitOptions(source=source) if console is None else FitOptions(console=console, source=source)
        summary = fit(cfg, opts) or {}
        record["test_eval_s"] = summary.get("test_eval_s")
        if summary.get("interrupted"):  # Ctrl-C / SIGTERM: fit kept last.pt and returned; the bench stops
            record["error"] = "interrupted (Ctrl-C or SIGTERM): no test evaluation; the bench stopped here"
            record["interrupted"] = True
    except Exception as e:  # noqa: BLE001 -- one failed recipe must not lose the others
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    record["wall_s"] = time.perf_counter() - start
    if source is not None:
        record["loader"] = source.kinds.get("train")
    record["device"] = (run.read_env() or {}).get("device")  # what --device auto resolved to
    record.update(time_to_targets(run.read_metrics(), spec.targets))
    try:
        test = run.read_eval("test")
    except Exception:  # noqa: BLE001 -- no test evaluation (failed or interrupted run): scores are null
        test = None
    record["test_balanced_accuracy"], record["test_balanced_accuracy_ci"] = held_out_scores(test)
    scored = (test or {}).get("eval") or {}
    record["test_weights"] = {"checkpoint": scored.get("checkpoint"), "epoch": scored.get("epoch"),
                              "tta": scored.get("tta")} if scored else None  # what the test score scored
    return record


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(runs: list[dict[str, Any]], targets: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per recipe: means over its successful seeds; a target's mean time only over the seeds that
    reached it (`reached` says how many did)."""
    out: dict[str, dict[str, Any]] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        ok = [r for r in runs if r["recipe"] == recipe and not r["error"]]
        tta, reached = {}, {}
        for target in targets:
            k = target_key(target)
            times = [r["time_to_target"][k] for r in ok if r["time_to_target"].get(k) is not None]
            tta[k], reached[k] = _mean(times), len(times)
        out[recipe] = {"seeds": len(ok), "failed": sum(1 for r in runs if r["recipe"] == recipe and r["error"]),
                       "time_to_target": tta, "reached": reached,
                       **{key: _mean([r[key] for r in ok]) for key in
                          ("best_val_balanced_accuracy", "test_balanced_accuracy", "img_per_s", "epochs",
                           "eval_s", "train_s")}}
    return out


def versus_baseline(runs: list[dict[str, Any]], baseline: str = BASELINE) -> dict[str, Any]:
    """Each other recipe against `baseline`, seed by seed (same seed, same split, same cores).

    The baseline's score is its best val balanced accuracy, reached at train-clock second t_base; the
    recipe's time to it is the first epoch whose val balanced accuracy is at least that (None when
    never). `time_ratio` = recipe time / t_base (the issue's "<= 1/4 of the baseline's time" reads
    it); `test_gain` = recipe test balanced accuracy - the baseline's. Means over the seeds where the
    number exists (`reached` counts the seeds with a ratio). Val curves, because the test split is
    scored once, at the end of each run."""
    ok = {(r["recipe"], r["seed"]): r for r in runs if not r["error"]}
    bases = [r for r in ok.values() if r["recipe"] == baseline and r["best_val_balanced_accuracy"] is not None]
    out: dict[str, Any] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in runs if r["recipe"] != baseline):
        seeds = []
        for base in bases:
            seed, other = base["seed"], ok.get((recipe, base["seed"]))
            if other is None:
                continue
            score = base["best_val_balanced_accuracy"]
            t_base = next(t for t, acc in base["curve"] if acc >= score)
            t_other = next((t for t, acc in other["curve"] if acc >= score), None)
            gain = (None if other["test_balanced_accuracy"] is None or base["test_balanced_accuracy"] is None
                    else other["test_balanced_accuracy"] - base["test_balanced_accuracy"])
            seeds.append({"seed": seed, "baseline_best_val": score, "baseline_s": t_base, "recipe_s": t_other,
                          "time_ratio": None if t_other is None else t_other / max(t_base, 1e-9),
                          "test_gain": gain})
        if seeds:
            out[recipe] = {"seeds": seeds, "time_ratio": _mean([s["time_ratio"] for s in seeds]),
                           "reached": sum(s["time_ratio"] is not None for s in seeds),
                           "test_gain": _mean([s["test_gain"] for s in seeds])}
    return out


def run_bench_tta(spec: TTASpec, log: Callable[[str], None] = lambda _m: None, console=None,
                  command: str = "") -> dict[str, Any]:
    """Every recipe x seed; the result dict, also written to OUT/tta.json and plotted in OUT/tta.png.

    tta.json is rewritten (atomically) after every run with `complete: false`, so an interrupted
    bench keeps the runs it finished; the last write says `complete: true` and names the plot."""

    budget_s = check_spec(spec)
    machine = hardware()  # at the start: the commit (and versions) that the runs are made with
    out = Path(spec.out)
    runs: list[dict[str, Any]] = []

    def result(complete: bool) -> dict[str, Any]:
        return {"complete": complete, "budget_s": budget_s, "clock": CLOCK,
                "targets": [float(t) for t in spec.targets], "runs": runs,
                "recipes": summarize(runs, spec.targets), "versus_baseline": versus_baseline(runs),
                "hardware": machine, "device": spec.device, "overrides": spec.overrides, "command": command}

    planned = [(recipe, seed) for recipe in spec.recipes for seed in spec.seeds]
    for recipe, seed in planned:
        log(f"{recipe} seed {seed}: training for {spec.budget} into {run_path(spec, recipe, seed)} ...")
        rec = run_one(spec, recipe, seed, console)
        log(f"{recipe} seed {seed}: " + (f"failed: {rec['error']}" if rec["error"] else
                                          f"{rec['epochs']} epochs, best val bal acc "
                                          f"{rec['best_val_balanced_accuracy']:.3f}"))
        runs.append(rec)
        atomic_write_text(out / "tta.json", json.dumps(result(False), indent=2) + "\n")
        if rec.get("interrupted"):
            log(f"interrupted: {len(runs)} of {len(planned)} runs; {out / 'tta.json'} keeps them (complete: false)")
            break
    final = result(len(runs) == len(planned) and not runs[-1].get("interrupted"))
    final["plot"] = str(plot_tta(final, out / "tta.png"))
    atomic_write_text(out / "tta.json", json.dumps(final, indent=2) + "\n")
    return final


def plot_tta(result: dict[str, Any], path: str | Path) -> Path:
    """Val balanced accuracy against the train clock, a line per recipe x seed, targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hamengine.engine.evaluate.plots_eval import (
        save_figure,  # lazy: matplotlib only when a figure is drawn
    )

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {name: f"C{i}" for i, name in enumerate(result["recipes"])}
    for r in result["runs"]:
        if r["curve"]:
            t, acc = zip(*r["curve"], strict=True)
            ax.plot(t, acc, "o-", ms=3, color=colors[r["recipe"]], label=f"{r['recipe']} s{r['seed']}")
    for target in result["targets"]:
        ax.axhline(target, ls="--", lw=0.8, color="grey")
    ax.set_xlabel(f"seconds ({result['clock']})")
    ax.set_ylabel("val balanced accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if any(r["curve"] for r in result["runs"]):
        ax.legend(loc="best", fontsize=8)
    ax.set_title(f"time to balanced accuracy, budget {result['budget_s']:.0f} s")
    fig.tight_layout()
    return save_figure(fig, path)
