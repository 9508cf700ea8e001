"""Shared fixtures. Real HAM10000 fixtures live in ../shared/data (present in CI); tests that use
them skip cleanly when they are absent. Set HAMENGINE_DATA to point elsewhere."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("HAMENGINE_DATA", REPO.parent / "shared" / "data"))
DEV_200PX = DATA_ROOT / "ham10000-200px-dev"
FULLRES_70 = DATA_ROOT / "ham10000-fullres-70"


def _require(path: Path) -> Path:
    if not (path / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 fixture not found at {path} (set HAMENGINE_DATA)")
    return path


@pytest.fixture(scope="session")
def dev200() -> Path:
    """3,011 real HAM10000 images at 200x150, Kaggle layout."""
    return _require(DEV_200PX)


@pytest.fixture(scope="session")
def fullres70() -> Path:
    """70 original 600x450 HAM10000 images, 10 per class, Kaggle layout."""
    return _require(FULLRES_70)


def pytest_configure(config: pytest.Config) -> None:
    # Tests run on 2 cores: keep torch from oversubscribing them when xdist is not used.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
