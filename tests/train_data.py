"""Small real datasets for the training tests: synth -> pack, built once per test session."""
from __future__ import annotations

from pathlib import Path

from hamengine.config import PackConfig
from hamengine.loaders.pack import pack_dataset
from hamengine.loaders.synth import synthesize

_CACHE: dict[tuple, Path] = {}


def small_pack(root: Path, n: int = 1000, image_size: tuple[int, int] = (128, 96), pack_size: int = 72) -> Path:
    """A pack of n synthetic HAM10000-like images (lesion-grouped splits), cached per session."""
    key = (str(root), n, image_size, pack_size)
    if key not in _CACHE:
        synth = synthesize(root / f"synth-{n}", n=n, size=image_size, progress=False)
        out = root / f"pack-{n}-{pack_size}"
        pack_dataset(PackConfig(source=str(synth), out=str(out), size=pack_size), progress=False)
        _CACHE[key] = out
    return _CACHE[key]
