"""Where training batches come from: a pack read through hamengine.loaders.build_loader.

`FitOptions.source` accepts any object with the same three members (labels, loader, classes),
which is how tests feed the trainer other data without a pack.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hamengine.config import LoaderConfig
from hamengine.loaders import build_loader
from hamengine.loaders.pack.records import Pack


class PackSource:
    """Batches from a pack through hamengine.loaders.build_loader (the loader contract)."""

    def __init__(self, pack: str | Path):

        self.pack = Pack(pack)
        self.classes = tuple(self.pack.classes)

    @property
    def fingerprint(self) -> str:
        return self.pack.fingerprint

    def labels(self, split: str) -> np.ndarray:
        return self.pack.labels(split)

    def loader(self, split: str, cfg: LoaderConfig, device: torch.device, rank: int = 0, world_size: int = 1):

        return build_loader(self.pack, split, cfg, device, rank=rank, world_size=world_size)
