"""plots/curves.png: training and validation curves, redrawn after every epoch (matplotlib Agg)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; safe in threads, servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from hamengine.engine.evaluate.plots_eval import save_figure


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss (train, val), validation accuracy / balanced accuracy / macro AUC, and throughput."""

    ep = [r["epoch"] for r in rows]

    def col(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else r[key] for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(ep, col("train_loss"), "o-", label="train")
    axes[0].plot(ep, col("val_loss"), "o-", label="val")
    axes[0].set_title("loss")
    for key, label in (("val_balanced_accuracy", "val balanced acc"), ("val_accuracy", "val accuracy"),
                       ("val_macro_auc", "val macro AUC")):
        axes[1].plot(ep, col(key), "o-", label=label)
    axes[1].set_ylim(0, 1)
    axes[1].set_title("validation")
    axes[2].plot(ep, col("img_per_s"), "o-", label="img/s (steady)")
    axes[2].set_title("throughput")
    lr_ax = axes[2].twinx()
    lr_ax.plot(ep, col("lr"), "--", color="grey", label="lr")
    lr_ax.set_ylabel("lr")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
