"""Temperature scaling (Guo et al. 2017) and per-class decision biases, fitted on val.

probs' = softmax(log(p) / T + b). T (one scalar) minimizes val NLL; b (one value per class, mean 0)
maximizes val balanced accuracy (`--decision val-bias`). Any log-probabilities work as logits
(softmax is shift-invariant per row), so averaged TTA probabilities adjust through log(p). Both are
stored in RUN/calibration.json; `Adjustment.apply` is the one function that eval (metrics,
predictions.csv, the ISIC CSV), predict and serve use, so every consumer gives the same numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize_scalar

from hamengine.engine.evaluate.metrics import balanced_accuracy
from hamengine.engine.runtime.run import RunDir
from hamengine.fileio import atomic_write_text

if TYPE_CHECKING:
    import torch

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


def _ascend(z: np.ndarray, y: np.ndarray, num_classes: int, grid: np.ndarray, sweeps: int) -> np.ndarray:
    """Coordinate ascent on the grid; each class's whole grid is scored in one vectorized step.
    The grid is ordered by |b| and argmax takes the first best, so ties keep the smaller |b|."""
    grid = grid[np.argsort(np.abs(grid), kind="stable")]
    b = np.zeros(num_classes)
    best = balanced_accuracy(y, (z + b).argmax(1)[None], num_classes)[0]
    for _ in range(sweeps):
        changed = False
        for c in range(num_classes):
            trial = np.broadcast_to(z + b, (len(grid),) + z.shape).copy()  # [G, N, C]
            trial[:, :, c] = z[None, :, c] + grid[:, None]
            scores = balanced_accuracy(y, trial.argmax(2), num_classes)
            i = int(scores.argmax())
            if scores[i] > best + 1e-12:
                best, b[c], changed = scores[i], grid[i], True
        if not changed:
            break
    return b - b.mean()


def fit_class_bias(logits: np.ndarray, y_true: np.ndarray, num_classes: int | None = None,
                   grid: np.ndarray | None = None, sweeps: int = 3, n_boot: int = 25, seed: int = 0
                   ) -> np.ndarray:
    """Per-class biases b (normalized to sum 0: argmax is shift-invariant) maximizing the balanced
    accuracy of argmax(logits + b) on (logits, y).

    Coordinate ascent over classes on a grid (default -3..3 step 0.05), ties toward the smaller |b|.
    Val is small on HAM10000 (about 5 df images), so the fit is averaged over `n_boot` seeded
    bootstrap resamples of the samples to cut its variance; if that average scores below argmax on
    the full set, the full-set fit is returned instead, so balanced accuracy on the fitted set never
    falls below b = 0's. Measure on test before trusting it (BENCHMARKS.md)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    c = int(num_classes or z.shape[1])
    if len(y) == 0:
        raise ValueError("cannot fit class biases on zero samples")
    grid = np.round(np.arange(-3.0, 3.0001, 0.05), 10) if grid is None else np.asarray(grid, np.float64)
    full = _ascend(z, y, c, grid, sweeps)
    if n_boot <= 0:
        return full
    rng = np.random.default_rng(seed)
    fits = [_ascend(z[i], y[i], c, grid, sweeps) for i in (rng.integers(0, len(y), len(y))
                                                            for _ in range(n_boot))]
    avg = np.mean(fits, axis=0)
    avg = avg - avg.mean()
    base = balanced_accuracy(y, z.argmax(1), c)
    return avg if balanced_accuracy(y, (z + avg).argmax(1), c) >= base else full


@dataclass(frozen=True)
class Adjustment:
    """What RUN/calibration.json holds: probs' = softmax(log(p) / T + class_bias)."""

    temperature: float = 1.0
    class_bias: tuple[float, ...] | None = None

    @property
    def decision(self) -> str:
        return "val-bias" if self.class_bias is not None else "argmax"

    @property
    def identity(self) -> bool:
        return self.temperature == 1.0 and self.class_bias is None

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """float64 [N, C] -> adjusted probabilities (rows sum to 1)."""
        if self.identity:
            return np.asarray(probs, dtype=np.float64)
        z = log_probs(probs) / self.temperature
        if self.class_bias is not None:
            z = z + np.asarray(self.class_bias, dtype=np.float64)
        return softmax_t(z)

    def apply_torch(self, probs: "torch.Tensor") -> "torch.Tensor":
        """The same rule on a torch tensor, computed in float64 on the CPU via `apply` so the numbers
        are bit-identical to eval's."""
        import torch

        return torch.from_numpy(self.apply(probs.detach().double().cpu().numpy()))


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("not a mapping")
        return data
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: unreadable calibration file ({e}); delete it or rerun "
                         f"`hamengine eval RUN --calibrate`") from None


def save_calibration(run: str | Path, temperature: float, info: dict[str, Any] | None = None) -> Path:
    """Set the temperature in RUN/calibration.json (atomic), keeping a stored class bias."""
    data = {k: v for k, v in _read(RunDir(run).calibration).items() if k in ("class_bias", "bias_info")}
    return atomic_write_text(RunDir(run).calibration,
                             json.dumps({**data, "temperature": float(temperature), **(info or {})}, indent=2))


def save_class_bias(run: str | Path, bias: np.ndarray, info: dict[str, Any]) -> Path:
    """Set the class bias in RUN/calibration.json (atomic), keeping a stored temperature."""
    data = _read(RunDir(run).calibration)
    data.setdefault("temperature", 1.0)
    data.update(class_bias=[float(v) for v in bias], bias_info=info)
    return atomic_write_text(RunDir(run).calibration, json.dumps(data, indent=2))


def load_adjustment(run: str | Path, num_classes: int | None = None) -> Adjustment:
    """The run's adjustment; the identity when the run has no calibration.json."""
    path = RunDir(run).calibration
    data = _read(path)
    if not data:
        return Adjustment()
    try:
        t = float(data["temperature"])
        bias = data.get("class_bias")
        bias = None if bias is None else tuple(float(v) for v in bias)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable calibration file ({e!r}); delete it or rerun "
                         f"`hamengine eval RUN --calibrate`") from None
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"{path}: temperature must be a positive number, got {t}")
    if bias is not None and (not all(np.isfinite(bias)) or (num_classes and len(bias) != num_classes)):
        raise ValueError(f"{path}: class_bias must be {num_classes or 'one'} finite number(s) per class, got "
                         f"{list(bias)}; delete the key or refit with `hamengine eval RUN --fit-bias`")
    return Adjustment(t, bias)


def load_temperature(run: str | Path) -> float:
    """The run's fitted temperature, 1.0 when the run was never calibrated."""
    return load_adjustment(run).temperature
