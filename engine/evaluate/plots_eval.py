"""Evaluation figures: confusion matrices, ROC curves, reliability diagram, confidence histogram and
image galleries. Each function draws from the data it is given (the same arrays that go into
metrics.json), writes one PNG atomically and returns what it drew, so tests can compare the two.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from hamengine.config import CLASS_NAMES  # noqa: E402
from hamengine.fileio import atomic_write_bytes

DPI = 110


def save_figure(fig: Figure, path: str | Path) -> Path:
    """PNG via a temp file + os.replace: a reader never sees a half-written figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path,
                   title: str = "") -> dict[str, np.ndarray]:
    """Counts and row-normalized (recall) matrices side by side; rows true, columns predicted.
    Returns the arrays held by the two drawn images."""
    counts = np.asarray(cm, dtype=np.int64)  # [C, C]
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    c = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(4.2 + 1.1 * c, 0.7 * c + 1.2))
    drawn = {}
    for ax, data, name, fmt in ((axes[0], counts, "counts", "d"), (axes[1], norm, "row-normalized", ".2f")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(1, data.max()) if fmt == "d" else 1.0)
        drawn[name] = np.asarray(im.get_array())
        hi = data.max() if data.size else 0
        for i in range(c):
            for j in range(c):
                v = data[i, j]
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                        color="white" if hi and v > 0.6 * hi else "black")
        ax.set_xticks(range(c), classes, rotation=45, ha="right")
        ax.set_yticks(range(c), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return drawn


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], aucs: dict[str, float | None],
             path: str | Path) -> None:
    """One-vs-rest ROC per class (classes absent from y_true are skipped, as in macro AUC)."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for c, dx in enumerate(classes):
        y_bin = y_true == c
        if aucs.get(dx) is None:
            continue
        fpr, tpr, _ = roc_curve(y_bin, probs[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{dx} (AUC {aucs[dx]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_reliability(bins: dict[str, list], ece: float, path: str | Path, ece_before: float | None = None
                     ) -> None:
    """Accuracy vs confidence per bin (bar width = bin), with the bin counts below."""
    edges = np.asarray(bins["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.array([np.nan if a is None else a for a in bins["accuracy"]])
    conf = np.array([np.nan if a is None else a for a in bins["confidence"]])
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 6), height_ratios=[3, 1], sharex=True)
    ax.bar(centers, np.nan_to_num(acc), width=width * 0.95, color="tab:blue", label="accuracy")
    ax.bar(centers, np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=width * 0.95,
           color="tab:red", alpha=0.35, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    label = f"ECE {ece:.3f}" + (f" (before calibration {ece_before:.3f})" if ece_before is not None else "")
    ax.set_title(f"Reliability diagram, {label}")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(centers, bins["count"], width=width * 0.95, color="gray")
    axc.set_ylabel("images")
    axc.set_xlabel("top-1 confidence")
    save_figure(fig, path)


def plot_confidence_hist(probs: np.ndarray, y_true: np.ndarray, path: str | Path) -> None:
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == y_true
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 26)
    ax.hist(conf[right], bins=bins, alpha=0.6, color="tab:green", label=f"correct ({right.sum()})")
    ax.hist(conf[~right], bins=bins, alpha=0.6, color="tab:red", label=f"wrong ({(~right).sum()})")
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("images")
    ax.set_title("Confidence of correct vs wrong predictions")
    ax.legend()
    save_figure(fig, path)


def _prob_bars(ax, p: np.ndarray, classes: Sequence[str], true: int, pred: int) -> None:
    colors = ["tab:green" if i == true else ("tab:red" if i == pred else "tab:gray") for i in range(len(p))]
    ax.barh(range(len(p)), p, color=colors)
    ax.set_yticks(range(len(p)), classes, fontsize=7)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=6)


def plot_gallery(items: Sequence[int], load_image: Callable[[int], Image.Image], probs: np.ndarray,
                 y_true: np.ndarray, classes: Sequence[str], names: Sequence[str], path: str | Path,
                 title: str, cols: int = 4) -> int:
    """Image + probability bars per item (row indices into probs). Returns the number drawn."""
    n = len(items)
    if n == 0:
        fig, ax = plt.subplots(figsize=(5, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: nothing to show", ha="center", va="center")
        save_figure(fig, path)
        return 0
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4.6 * cols, 2.3 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3, 1] * cols})
    for k in range(rows * cols):
        ax_img, ax_bar = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        if k >= n:
            ax_img.axis("off")
            ax_bar.axis("off")
            continue
        i = items[k]
        t, p = int(y_true[i]), int(probs[i].argmax())
        ax_img.imshow(load_image(i))
        ax_img.axis("off")
        ax_img.set_title(f"{names[i]}\ntrue {classes[t]} / pred {classes[p]} {probs[i, p]:.2f}", fontsize=7)
        _prob_bars(ax_bar, probs[i], classes, t, p)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return n


def confident_mistakes(probs: np.ndarray, y_true: np.ndarray, k: int = 12) -> list[int]:
    """Rows of the k wrong predictions with the highest confidence."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != y_true)
    order = np.argsort(-probs[wrong].max(axis=1), kind="stable")
    return wrong[order][:k].tolist()


def correct_per_class(probs: np.ndarray, y_true: np.ndarray, per_class: int = 2) -> list[int]:
    """For every class, its most confident correct predictions (up to per_class each)."""
    pred = probs.argmax(axis=1)
    out: list[int] = []
    for c in range(probs.shape[1]):
        hit = np.flatnonzero((pred == c) & (y_true == c))
        out += hit[np.argsort(-probs[hit, c], kind="stable")][:per_class].tolist()
    return out


def class_legend(classes: Sequence[str]) -> str:
    return "; ".join(f"{dx}: {CLASS_NAMES.get(dx, dx)}" for dx in classes)
