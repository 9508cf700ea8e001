"""Test data: synthetic sources, packs and trained runs. conftest.py wraps each recipe the tests
share in a session fixture; the builders here are idempotent (called again with the same recipe
they return what is already on disk), so a test module that builds one directly shares the build.

Sizes are part of the recipes: the learning tests' bounds were measured on exactly these datasets."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from hamengine.config import CLASSES, PackConfig, TrainConfig

META = "HAM10000_metadata.csv"
PART = "HAM10000_images_part_1"


def copy_of(folder: Path, dest: Path) -> Path:
    """A private copy of shared session data, for a test that writes into it."""
    shutil.copytree(folder, dest)
    return dest


def synth_source(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (200, 150)) -> Path:
    """`hamengine synth`: n dermoscopy-like images (lesion groups, real class balance), Kaggle layout."""
    from hamengine.loaders.ingest.synth import synthesize

    out = root / f"synth-{n}-seed{seed}-{size[0]}x{size[1]}"
    if not (out / META).is_file():  # the CSV is written last: its presence means complete
        synthesize(out, n=n, seed=seed, size=size, workers=2, progress=False)
    return out


def noise_source(root: Path, n: int = 120, size: tuple[int, int] = (64, 48), seed: int = 0,
                 progressive: bool = False) -> Path:
    """A Kaggle-layout HAM10000 folder: synthetic metadata (real class balance, several images per
    lesion) and small noise JPEGs whose mean colour depends on the class (fast to make and pack)."""
    from hamengine.loaders.ingest.synth import synth_metadata

    df = synth_metadata(n, seed)
    (root / PART).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for image_id, dx in zip(df["image_id"], df["dx"], strict=True):
        base = np.array([40 + 30 * CLASSES.index(dx), 90, 160], np.int16)
        px = np.clip(base + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / PART / f"{image_id}.jpg", quality=95, progressive=progressive)
    df.to_csv(root / META, index=False)
    return root


def packed(source: Path, out: Path, size: int, **options) -> Path:
    """`hamengine pack` of `source` at `size` px into `out` (PackConfig `options` on top)."""
    from hamengine.loaders.pack.writer import pack_dataset

    if not (out / "manifest.json").is_file():
        pack_dataset(PackConfig(source=str(source), out=str(out), size=size, workers=2, **options),
                     progress=False)
    return out


def trained(pack: Path, out: Path, test_eval: bool = True, **config) -> Path:
    """`hamengine train` on CPU (TrainConfig `config` on top of its defaults); the run folder."""
    from rich.console import Console

    from hamengine.engine.train.trainer import FitOptions, fit

    if not (out / "checkpoints" / "best.pt").is_file():
        cfg = TrainConfig(pack=str(pack), out=str(out), device="cpu", **config)
        fit(cfg, FitOptions(console=Console(file=io.StringIO()), test_eval=test_eval))
    assert (out / "checkpoints" / "best.pt").is_file(), f"training wrote no best.pt in {out}"
    return out


def train_pack(root: Path, n: int = 1000, image_size: tuple[int, int] = (128, 96), pack_size: int = 72) -> Path:
    """The training tests' pack: n synthetic images packed at pack_size (lesion-grouped splits)."""
    return packed(synth_source(root, n, 0, image_size), root / f"pack-{n}-{pack_size}", pack_size)
