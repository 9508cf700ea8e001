"""Temperature scaling (Guo et al. 2017): one scalar T, fitted on val by minimizing NLL.

probs_T = softmax(logits / T). Any log-probabilities work as logits (softmax is shift-invariant per
row), so averaged TTA probabilities calibrate through log(p). The fitted T is stored in
RUN/calibration.json; predict and serve apply it when present.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from hamengine.engine.run import CALIBRATION_FILE, RunDir  # noqa: F401  (CALIBRATION_FILE re-exported)
from hamengine.fileio import atomic_write_text

_EPS = 1e-12


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities -> logits usable for temperature scaling (log, clipped away from 0)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, None))


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)  # stable: exp of non-positive numbers only
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll_at(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    p = softmax_t(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _EPS, None))))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
                    ) -> float:
    """T minimizing NLL on (logits, y). NLL is convex in 1/T, so a bounded 1-D search on log T is exact
    enough and needs no gradients."""
    y = np.asarray(y_true, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(lambda lt: nll_at(logits, y, float(np.exp(lt))), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def save_calibration(run: str | Path, temperature: float, info: dict[str, Any] | None = None) -> Path:
    """Write RUN/calibration.json atomically (temp file + fsync + replace)."""
    return atomic_write_text(RunDir(run).calibration,
                             json.dumps({"temperature": float(temperature), **(info or {})}, indent=2))


def load_temperature(run: str | Path) -> float:
    """The run's fitted temperature, 1.0 when the run was never calibrated."""
    path = RunDir(run).calibration
    if not path.is_file():
        return 1.0
    try:
        t = float(json.loads(path.read_text(encoding="utf-8"))["temperature"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable calibration file ({e}); delete it or rerun "
                         f"`hamengine eval RUN --calibrate`") from None
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"{path}: temperature must be a positive number, got {t}")
    return t
