"""Checkpoints: plain dicts of tensors / numbers / strings / lists, so that
`torch.load(path, weights_only=True)` reads them; written atomically (temp file, fsync, rename).

Format (`format` = "hamengine-checkpoint", `version` = 1):
- last.pt (written after every completed epoch; the exact resume point): epoch (completed epochs),
  config (hamengine.config.to_dict), classes, model_name, model (state dict, unwrapped from DDP /
  torch.compile), ema (state dict or None), optimizer, scaler (or None), rng (one entry
  per rank: torch / cuda / numpy / python states), best {metric, epoch}, epochs_since_best, metrics.
- best.pt (written when the validation balanced accuracy improves): epoch, config, classes,
  model_name, model (the weights that were evaluated: EMA weights when EMA is on), metrics.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hamengine.errors import UserError
from hamengine.fileio import atomic_output, fsync_dir
from hamengine.models.wrappers import strip_wrapper_prefixes

FORMAT = "hamengine-checkpoint"
VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, truncated or not ours; the message names the file and what to do."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` so that a reader sees the old file or the whole new one, never half."""
    path = Path(path)
    with atomic_output(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    fsync_dir(path.parent)  # the rename itself reaches the disk
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; any damage is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); "
            "delete it and start again (best.pt and last.pt are written separately: the other may "
            "still be intact)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hamengine checkpoint (no format={FORMAT!r} key)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']}; this hamengine reads "
                              f"up to {VERSION}: upgrade hamengine")
    return state


def model_weights(state: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The weights that were validated: best.pt's 'model' (already EMA weights when EMA was on);
    in last.pt the EMA copy ({'model': state dict, 'updates': n}) when present, else 'model'.
    Keys carry no DDP / torch.compile prefix, even in checkpoints written before they were unwrapped."""
    ema = state.get("ema")
    weights = ema.get("model") if isinstance(ema, dict) else None
    if not isinstance(weights, dict):
        weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: no model weights in this checkpoint (expected a 'model' state dict)")
    return strip_wrapper_prefixes(weights)


# ---------------------------------------------------------------- RNG state as plain data

def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, as tensors / lists (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


__all__ = ["CheckpointError", "load_checkpoint", "model_weights", "rng_state", "save_checkpoint",
           "set_rng_state"]
