"""Classification metrics for the 7 HAM10000 classes, with lesion-level bootstrap intervals.

Conventions (documented because the edge cases decide the numbers):
- Prediction = argmax of the probabilities (numpy: the first of tied maxima; the ISIC scorer counts a
  tie as wrong, which only matters for exactly tied probabilities).
- Balanced accuracy = mean recall over the classes PRESENT in y_true (as scikit-learn and the ISIC 2018
  Task 3 ranking do); a class with no true sample has no recall.
- Macro F1 = mean F1 over classes present in y_true or predicted (scikit-learn's default label set);
  precision of a never-predicted class is 0 (scikit-learn's zero_division=0).
- One-vs-rest AUC per class; a class absent from y_true (or present in every row) has auc None and is
  EXCLUDED from macro and weighted AUC (weighted = by support). `auc_excluded` lists such classes.
- Melanoma sensitivity at >= 80% / 90% specificity: best TPR over the ROC operating points whose
  specificity reaches the target (an achievable threshold, no interpolation).
- ECE: 15 equal-width bins of the top-1 confidence, bins (lo, hi]; NLL: mean -log p(true class);
  Brier: mean over samples of the multi-class sum of squared errors (range 0..2).
- Bootstrap (n_boot > 0): resample LESIONS with replacement (images of one lesion move together, so the
  interval reflects the number of independent lesions, not images); 95% percentile intervals.
Everything returned is plain JSON (floats, ints, lists, dicts, None).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from hamengine.config import CLASSES

ECE_BINS = 15
_EPS = 1e-12


def _check(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(classes):
        raise ValueError(f"probs must have shape [N, {len(classes)}] (one column per class in "
                         f"{', '.join(classes)}), got {list(p.shape)}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} labels but probs has {p.shape[0]} rows")
    if y.size == 0:
        raise ValueError("no samples to score")
    if y.min() < 0 or y.max() >= len(classes):
        raise ValueError(f"labels must be class indices 0..{len(classes) - 1}, got {y.min()}..{y.max()}")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    return y, p


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per-bin count, mean confidence and accuracy of the top-1 prediction (bins (lo, hi])."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    # ceil(conf * n) - 1 puts conf in (k/n, (k+1)/n] into bin k; conf == 0 goes to bin 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, sum_acc / np.maximum(count, 1), np.nan)
    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "count": count.tolist(),
            "confidence": [None if np.isnan(v) else float(v) for v in mean_conf],
            "accuracy": [None if np.isnan(v) else float(v) for v in acc]}


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """sum_b |acc_b - conf_b| * n_b / N over equal-width confidence bins."""
    bins = reliability_bins(probs, y_true, n_bins)
    n = float(len(y_true))
    return float(sum(abs(a - c) * k / n for a, c, k in
                     zip(bins["accuracy"], bins["confidence"], bins["count"], strict=True) if k > 0))


def nll(probs: np.ndarray, y_true: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], _EPS, None))))


def brier(probs: np.ndarray, y_true: np.ndarray) -> float:
    onehot = np.eye(probs.shape[1])[y_true]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def sensitivity_at_specificity(y_bin: np.ndarray, scores: np.ndarray, specificity: float) -> float | None:
    """Best TPR among ROC operating points with 1 - FPR >= specificity; None without both classes."""
    if y_bin.min() == y_bin.max():
        return None
    fpr, tpr, _ = roc_curve(y_bin, scores)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max())


def _f(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def _per_class(cm: np.ndarray, y: np.ndarray, p: np.ndarray, classes: Sequence[str]) -> dict[str, dict]:
    n = cm.sum()
    out: dict[str, dict] = {}
    for c, dx in enumerate(classes):
        tp = int(cm[c, c])
        support = int(cm[c].sum())
        predicted = int(cm[:, c].sum())
        fp, fn = predicted - tp, support - tp
        tn = int(n - tp - fp - fn)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else None
        specificity = tn / (tn + fp) if (tn + fp) else None
        if support == 0 and predicted == 0:
            f1 = None
        else:
            f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
        y_bin = (y == c).astype(np.int64)
        auc = float(roc_auc_score(y_bin, p[:, c])) if 0 < support < len(y) else None
        out[dx] = {"precision": float(precision), "recall": _f(recall), "specificity": _f(specificity),
                   "f1": _f(f1), "auc": auc, "support": support}
    return out


# ---------------------------------------------------------------- bootstrap (vectorized over replicates)

def balanced_accuracy(y: np.ndarray, pred: np.ndarray, num_classes: int,
                      weights: np.ndarray | None = None) -> np.ndarray:
    """Balanced accuracy: the mean recall over the classes present in y (weight > 0). The one
    implementation, vectorized for the callers that need many at once:
      pred [N]                      -> a 0-d array (float() it)
      pred [G, N] (G predictions)   -> [G]     (the decision-bias search)
      pred [N], weights [B, N]      -> [B]     (bootstrap replicates as sample weights)"""
    onehot = np.eye(num_classes)[y]  # N,C
    correct = np.atleast_2d(pred) == y  # G,N (G = 1 for a single prediction)
    if weights is None:
        support = onehot.sum(0)[None]  # 1,C
        hits = correct.astype(np.float64) @ onehot  # G,C
    else:
        if correct.shape[0] != 1:
            raise ValueError("balanced_accuracy: weights go with one prediction [N]")
        support = weights @ onehot  # B,C
        hits = weights @ (onehot * correct[0][:, None])  # B,C
    recall = np.where(support > 0, hits / np.where(support > 0, support, 1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no class present: nan, not a warning
        out = np.nanmean(recall, axis=1)
    return out[0] if np.ndim(pred) == 1 and weights is None else out


def _weighted_auc(w: np.ndarray, y_bin: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC with sample weights (ties count 1/2): w [B, N] -> [B], NaN when undefined."""
    order = np.argsort(scores, kind="stable")
    s, yb, ws = scores[order], y_bin[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tie group
    pos = np.add.reduceat(ws * yb, starts, axis=1)  # [B, G] positive weight per tie group
    neg = np.add.reduceat(ws * (1 - yb), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
    wp, wn = pos.sum(axis=1), neg.sum(axis=1)
    num = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((wp > 0) & (wn > 0), num / (wp * wn), np.nan)


def weighted_macro_auc(w: np.ndarray, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """[B] macro one-vs-rest AUC under sample weights w [B, N]; undefined classes excluded."""
    aucs = np.stack([_weighted_auc(w, (y == c).astype(np.float64), probs[:, c])
                     for c in range(probs.shape[1])], axis=1)  # [B, C]
    with warnings.catch_warnings():  # a replicate with no defined AUC is NaN, dropped by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(aucs, axis=1)


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, groups: np.ndarray, n_boot: int, seed: int = 0,
                 level: float = 0.95, chunk: int = 200) -> dict[str, Any]:
    """Percentile intervals for balanced accuracy and macro AUC, resampling groups (lesions).

    Drawing G groups with replacement = multinomial counts per group; each image then weighs its
    group's count, so one replicate is a weight vector and all metrics vectorize over replicates.
    """
    _, gidx = np.unique(groups, return_inverse=True)
    n_groups = int(gidx.max()) + 1
    rng = np.random.default_rng(seed)
    pred = probs.argmax(axis=1)
    bacc, mauc = [], []
    for start in range(0, n_boot, chunk):  # chunks bound memory at chunk x N floats
        b = min(chunk, n_boot - start)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=b)  # [b, G]
        w = counts[:, gidx].astype(np.float64)  # [b, N]
        bacc.append(balanced_accuracy(y, pred, probs.shape[1], weights=w))
        mauc.append(weighted_macro_auc(w, y, probs))
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(v: np.ndarray) -> list[float | None]:
        v = v[~np.isnan(v)]
        return [float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))] if v.size else [None, None]

    return {"balanced_accuracy": interval(np.concatenate(bacc)), "macro_auc": interval(np.concatenate(mauc)),
            "n_boot": int(n_boot), "level": level, "resampled": "lesions", "n_groups": n_groups, "seed": seed}


# ---------------------------------------------------------------- entry point

def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES,
                           lesion_ids: Sequence[str] | np.ndarray | None = None, n_boot: int = 0,
                           seed: int = 0) -> dict[str, Any]:
    """All evaluation metrics of one split as a JSON-serializable dict (see the module docstring).

    y_true: int [N] class indices into `classes`; probs: [N, C] probabilities (rows sum to 1).
    lesion_ids: [N] group of each image for the bootstrap (None: every image is its own group).
    """
    classes = tuple(classes)
    y, p = _check(y_true, probs, classes)
    c = len(classes)
    pred = p.argmax(axis=1)
    cm = confusion(y, pred, c)
    per_class = _per_class(cm, y, p, classes)

    f1s = [v["f1"] for v in per_class.values() if v["f1"] is not None]
    defined = [(v["auc"], v["support"]) for v in per_class.values() if v["auc"] is not None]
    macro_auc = float(np.mean([a for a, _ in defined])) if defined else None
    weighted_auc = (float(sum(a * s for a, s in defined) / sum(s for _, s in defined))
                    if defined else None)

    mel = {}
    if "mel" in classes:
        m = classes.index("mel")
        y_mel = (y == m).astype(np.int64)
        for spec in (0.8, 0.9):
            mel[f"mel_sensitivity_at_{round(spec * 100)}_spec"] = sensitivity_at_specificity(
                y_mel, p[:, m], spec)
    else:
        mel = {"mel_sensitivity_at_80_spec": None, "mel_sensitivity_at_90_spec": None}

    out: dict[str, Any] = {
        "n": int(len(y)),
        "classes": list(classes),
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(balanced_accuracy(y, pred, c)),
        "macro_f1": float(np.mean(f1s)),
        "macro_auc": macro_auc,
        "weighted_auc": weighted_auc,
        "auc_excluded": [dx for dx, v in per_class.items() if v["auc"] is None],
        **mel,
        "ece": expected_calibration_error(p, y),
        "nll": nll(p, y),
        "brier": brier(p, y),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
    if n_boot > 0:
        groups = np.arange(len(y)) if lesion_ids is None else np.asarray(lesion_ids)
        if len(groups) != len(y):
            raise ValueError(f"lesion_ids has {len(groups)} entries for {len(y)} samples")
        out["ci"] = bootstrap_ci(y, p, groups, n_boot, seed)
    return out
