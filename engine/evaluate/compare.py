"""`hamengine compare`: evaluated runs side by side (e.g. our HamNet against transfer learning).

Reads each RUN/eval-<split>/metrics.json (written by `hamengine eval`), RUN/config.json and
RUN/metrics.jsonl; nothing is recomputed, so the comparison shows exactly what each eval reported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from hamengine.engine.evaluate.evaluator import write_json
from hamengine.engine.runtime.run import RunDir, RunError, check_split


def run_summary(run: Path, split: str = "test") -> dict[str, Any]:
    """One run's row: metrics with CIs, per-class recall, parameters, throughput and wall time."""
    rd = RunDir(run)
    m = rd.read_eval(split)
    if "eval" not in m:  # one schema, written by evaluate_run (eval and the end of training)
        raise RunError(f"{rd.eval_metrics_path(split)} was written by an older hamengine: run "
                       f"`hamengine eval {rd.path} --split {split}` again")
    ev = m["eval"]
    cfg = rd.read_config() if rd.config_path.is_file() else {}
    model, size = ev["model"], int(ev["input_size"])
    params = gflops = None
    try:
        from hamengine.models import model_info

        info = model_info(model, size)
        params, gflops = int(info["params"]), float(info["gflops"])
    except (ValueError, RuntimeError):  # a model this version no longer registers
        pass
    rows = rd.read_metrics()
    speeds = [r["img_per_s"] for r in rows if isinstance(r.get("img_per_s"), (int, float))]
    wall = sum(float(r.get("epoch_s") or 0) for r in rows) if rows else None
    ci = m.get("ci") or {}
    return {
        "run": rd.path.name, "path": str(rd.path), "model": model, "size": size, "params": params,
        "gflops": gflops, "epochs": len(rows) or None, "pretrained": cfg.get("pretrained"),
        "balanced_accuracy": m["balanced_accuracy"], "balanced_accuracy_ci": ci.get("balanced_accuracy"),
        "macro_auc": m["macro_auc"], "macro_auc_ci": ci.get("macro_auc"),
        "accuracy": m["accuracy"],
        "recall": {dx: v["recall"] for dx, v in m["per_class"].items()},
        "train_img_per_s": float(np.median(speeds)) if speeds else None,
        "train_wall_s": wall,
        "checkpoint": ev["checkpoint"], "tta": ev["tta"],
        "n": m["n"],
    }


def plot_compare(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hamengine.engine.evaluate.plots_eval import (
        save_figure,  # lazy: matplotlib only when a figure is drawn
    )

    names = [r["run"] for r in rows]
    y = np.arange(len(rows))
    classes = list(rows[0]["recall"]) if rows else []
    fig, axes = plt.subplots(1, 3, figsize=(15, 1.2 + 0.6 * len(rows) + 1.5), width_ratios=[1, 1, 1.6])
    for ax, key, title in ((axes[0], "balanced_accuracy", "balanced accuracy"), (axes[1], "macro_auc", "macro AUC")):
        vals = np.array([np.nan if r[key] is None else r[key] for r in rows])
        lo = np.array([v - r[f"{key}_ci"][0] if r.get(f"{key}_ci") and r[f"{key}_ci"][0] is not None else 0
                       for v, r in zip(vals, rows, strict=True)])
        hi = np.array([r[f"{key}_ci"][1] - v if r.get(f"{key}_ci") and r[f"{key}_ci"][1] is not None else 0
                       for v, r in zip(vals, rows, strict=True)])
        ax.barh(y, vals, xerr=[lo, hi], capsize=4, color="tab:blue", alpha=0.8)
        for yi, v in zip(y, vals, strict=True):
            ax.text(0.01, yi, f"{v:.3f}", va="center", color="white", fontsize=8)
        ax.set_yticks(y, names)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_title(f"{title} (95% CI)")
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(classes))
    for k, r in enumerate(rows):
        vals = [np.nan if r["recall"].get(c) is None else r["recall"][c] for c in classes]
        axes[2].bar(x + k * width - 0.4 + width / 2, vals, width, label=r["run"])
    axes[2].set_xticks(x, classes)
    axes[2].set_ylim(0, 1)
    axes[2].set_title("recall per class")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def compare_runs(runs: list[str | Path], split: str = "test", out: str | Path | None = None) -> dict[str, Any]:
    check_split(split)
    rows = [run_summary(Path(r), split) for r in runs]
    names = [r["run"] for r in rows]
    if len(set(names)) < len(names):  # same folder name in two places: show the paths
        for r in rows:
            r["run"] = r["path"]
    res: dict[str, Any] = {"split": split, "runs": rows}
    if out is not None:
        out = Path(out)
        res["figure"] = str(plot_compare(rows, out / "compare.png"))

        res["json"] = str(write_json(out / "compare.json", {k: v for k, v in res.items() if k != "json"}))
    return res


def _f(v: Any, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _with_ci(v: Any, ci: Any) -> str:
    s = _f(v)
    return s + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else "")


def compare_table(res: dict[str, Any]) -> Table:
    rows = res["runs"]
    t = Table(title=f"runs on {res['split']} (95% CI resampling lesions)")
    t.add_column("metric")
    for r in rows:
        t.add_column(r["run"], justify="right")
    t.add_row("model", *[str(r["model"]) for r in rows])
    t.add_row("balanced accuracy", *[_with_ci(r["balanced_accuracy"], r["balanced_accuracy_ci"]) for r in rows])
    t.add_row("macro AUC", *[_with_ci(r["macro_auc"], r["macro_auc_ci"]) for r in rows])
    t.add_row("accuracy", *[_f(r["accuracy"]) for r in rows])
    for dx in (rows[0]["recall"] if rows else {}):
        t.add_row(f"recall {dx}", *[_f(r["recall"].get(dx)) for r in rows])
    t.add_row("parameters", *["-" if r["params"] is None else f"{r['params'] / 1e6:.2f} M" for r in rows])
    t.add_row("input size", *[str(r["size"]) for r in rows])
    t.add_row("train img/s (median epoch)", *[_f(r["train_img_per_s"], 0) for r in rows])
    t.add_row("train wall time", *["-" if r["train_wall_s"] is None else f"{r['train_wall_s'] / 60:.1f} min"
                                   for r in rows])
    return t
