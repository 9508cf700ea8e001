"""Shared fixtures.

Real HAM10000 fixtures live in ../shared/data (present in CI); tests that use them skip cleanly when
they are absent. Set HAMENGINE_DATA to point elsewhere.

Synthetic test data (builders.py) is built at most once per session, under the session's base
temp folder. Session data is shared: a test that changes files copies them to its tmp_path first
(`builders.copy_of`)."""
from __future__ import annotations

import os
from pathlib import Path

import builders
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("HAMENGINE_DATA", REPO.parent / "shared" / "data"))
DEV_200PX = DATA_ROOT / "ham10000-200px-dev"
FULLRES_70 = DATA_ROOT / "ham10000-fullres-70"


@pytest.fixture(scope="session", autouse=True)
def host_plan_cache(tmp_path_factory) -> Path:
    """The execution-plan cache (engine/runtime/hostplan.py) of this session: its own folder, so that tests
    never read or write the user's ~/.cache, and each model/side/batch is probed once per session.
    Subprocesses inherit it through the environment."""
    path = tmp_path_factory.getbasetemp() / "host-plan-cache"
    path.mkdir(exist_ok=True)
    old = os.environ.get("HAMENGINE_CACHE_DIR")
    os.environ["HAMENGINE_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HAMENGINE_CACHE_DIR", None)
    else:
        os.environ["HAMENGINE_CACHE_DIR"] = old


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


def _root(factory: pytest.TempPathFactory, name: str) -> Path:
    path = factory.getbasetemp() / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    """150 synthetic dermoscopy-like images, 200x150, seed 3 (Kaggle layout)."""
    return builders.synth_source(_root(tmp_path_factory, "synth"), n=150, seed=3, size=(200, 150))


@pytest.fixture(scope="session")
def loader_pack(synth_source, tmp_path_factory) -> Path:
    """`synth_source` packed at 80 px: the loader tests read it at 64 px."""
    return builders.packed(synth_source, _root(tmp_path_factory, "packs") / "loader-80", 80)


@pytest.fixture(scope="session")
def serve_run(synth_source, tmp_path_factory) -> Path:
    """`synth_source` packed at 72 px, hamnet trained 1 epoch at 64 px (with its test evaluation)."""
    from serve_support import RUN_SIZE

    pack = builders.packed(synth_source, _root(tmp_path_factory, "packs") / "serve-72", RUN_SIZE + 8)
    return builders.trained(pack, _root(tmp_path_factory, "runs") / "serve", model="hamnet", epochs=1,
                            size=RUN_SIZE, batch_size=32)


@pytest.fixture(scope="session")
def meta_run(loader_pack, tmp_path_factory) -> Path:
    """hamnet trained with --meta, 1 short epoch at 48 px on `loader_pack` (with its test evaluation)."""
    return builders.trained(loader_pack, _root(tmp_path_factory, "runs") / "meta", model="hamnet", epochs=1,
                            size=48, batch_size=16, meta=True, loader="resident", max_steps_per_epoch=4)


@pytest.fixture(scope="session")
def train_pack(tmp_path_factory) -> Path:
    """1,000 synthetic images, 128x96, packed at 72 px: the training tests (their bounds are for it)."""
    return builders.train_pack(tmp_path_factory.getbasetemp() / "train-data")


@pytest.fixture(scope="session")
def eval_source(tmp_path_factory) -> Path:
    """240 synthetic images, 200x150, seed 5."""
    return builders.synth_source(_root(tmp_path_factory, "synth"), n=240, seed=5, size=(200, 150))


@pytest.fixture(scope="session")
def eval_pack(eval_source, tmp_path_factory) -> Path:
    """`eval_source` packed at 72 px."""
    return builders.packed(eval_source, _root(tmp_path_factory, "packs") / "eval-72", 72)


@pytest.fixture(scope="session")
def eval_run(eval_pack, tmp_path_factory) -> Path:
    """hamnet trained 2 short epochs at 64 px on `eval_pack`, no test evaluation (the eval tests run it)."""
    return builders.trained(eval_pack, _root(tmp_path_factory, "runs") / "eval", test_eval=False,
                            model="hamnet", epochs=2, batch_size=32, size=64, workers=2, warmup_epochs=0.0)


@pytest.fixture(scope="session")
def verify_pack(tmp_path_factory) -> Path:
    """60 noise images, 96x72, packed at 72 px in 64 KB shards (several per split): verify's cases."""
    root = _root(tmp_path_factory, "noise")
    source = builders.noise_source(root / "src-60-96x72", n=60, size=(96, 72))
    return builders.packed(source, _root(tmp_path_factory, "packs") / "verify-72", 72, shard_size=64 * 1024)


def pytest_configure(config: pytest.Config) -> None:
    # Tests run on 2 cores: keep torch from oversubscribing them when xdist is not used.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
