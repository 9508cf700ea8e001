"""The run directory (DESIGN.md): config.json, env.json, metrics.jsonl, checkpoints/, plots/,
eval-<split>/. Only rank 0 writes; every file is replaced atomically except metrics.jsonl, which
grows by whole lines (and is rewritten atomically when a resume drops epochs past the checkpoint)."""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

from hamengine.config import SPLITS, TrainConfig, to_dict
from hamengine.errors import ConfigError, UserError
from hamengine.fileio import atomic_write_text


class RunError(UserError, RuntimeError):
    """The run directory cannot be used as asked; the message says what to do."""


CALIBRATION_FILE = "calibration.json"


def check_split(split: str, option: str = "--split") -> str:
    if split not in SPLITS:
        raise ConfigError(f"{option} {split!r}: a pack has the splits {', '.join(SPLITS)}")
    return split


def read_json(path: Path) -> dict[str, Any]:
    """A run file that must exist and hold a JSON object; RunError saying what is wrong otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing: is {Path(path).parent} a run directory made by `hamengine train`?"
                       ) from None
    except ValueError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object")
    return data


class RunDir:
    """The only code that knows the run folder's file names (DESIGN.md "Run directory")."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # Fixed names (DESIGN.md "Run directory").
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def env_path(self) -> Path:
        return self.path / "env.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def eval_dir(self, split: str) -> Path:
        return self.path / f"eval-{check_split(split)}"

    def eval_metrics_path(self, split: str) -> Path:
        return self.eval_dir(split) / "metrics.json"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / f"{name}.pt"

    @property
    def calibration(self) -> Path:
        return self.path / CALIBRATION_FILE

    @property
    def metadata(self) -> Path:
        """The metadata encoding a --meta run was trained with (MetaSchema.record())."""
        return self.path / "metadata.json"

    @property
    def budget(self) -> Path:
        """The --budget plan and its re-plans (engine/train/budget.py)."""
        return self.path / "budget.json"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    def read_config(self) -> dict[str, Any]:
        return read_json(self.config_path)

    def read_env(self) -> dict[str, Any] | None:
        """env.json, or None when it is missing or unreadable (older or hand-made runs)."""
        try:
            return read_json(self.env_path)
        except RunError:
            return None

    def read_eval(self, split: str) -> dict[str, Any]:
        """eval-<split>/metrics.json as `hamengine eval` (or the end of training) wrote it."""
        path = self.eval_metrics_path(split)
        if not path.is_file():
            raise RunError(f"{path} is missing: run `hamengine eval {self.path} --split {split}` first")
        return read_json(path)

    def has_training(self) -> bool:
        return self.last.exists() or self.metrics_path.exists()

    def prepare(self, cfg: TrainConfig) -> None:
        """Create the directory for a new run (refusing to mix two runs) or check it for --resume."""
        if cfg.resume:
            if not self.last.is_file():
                raise RunError(f"--resume: {self.last} does not exist; nothing to resume (start a new "
                               f"run without --resume)")
        elif self.has_training():
            raise RunError(f"{self.path} already holds a run; pass --resume to continue it or choose "
                           "another --out")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.plots.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: TrainConfig) -> None:
        atomic_write_text(self.config_path, json.dumps(to_dict(cfg), indent=2) + "\n")

    def write_env(self, env: dict[str, Any]) -> None:
        record = {**env, "argv": sys.argv,
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(self.env_path, json.dumps(record, indent=2, default=str) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl, a dict per completed epoch (the only reader of that file)."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill -9: dropped, the checkpoint decides anyway
                continue
        return rows

    def truncate_metrics(self, epochs: int) -> list[dict[str, Any]]:
        """Keep the lines of the first `epochs` epochs (a killed run may have logged one more)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) <= epochs]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        return rows
