"""Our metrics and ISIC 2018 Task 3 files against the official scorer (isic-challenge-scoring 5.6.x).

Scorer conventions (read from its source): the prediction is the argmax, and a row whose maximum is
tied counts as wrong ("undecided"); we take the first maximum. With continuous probabilities ties do
not occur; test_tie_rule pins the difference down.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hamengine.config import CLASSES, ISIC_COLUMNS
from hamengine.engine.evaluate import calibration
from hamengine.engine.evaluate.evaluator import GROUND_TRUTH, SUBMISSION, SplitPredictions, write_predictions
from hamengine.engine.evaluate.metrics import classification_metrics

scoring = pytest.importorskip(
    "isic_challenge_scoring",
    reason="the official ISIC scorer is not installed: pip install 'isic-challenge-scoring>=5.6,<5.7'")


def case(n: int = 400, seed: int = 0) -> SplitPredictions:
    rng = np.random.default_rng(seed)
    y = rng.choice(7, size=n, p=[0.05, 0.08, 0.12, 0.03, 0.12, 0.55, 0.05])
    y[:7] = np.arange(7)
    probs = calibration.softmax_t(rng.normal(size=(n, 7)) + 1.3 * np.eye(7)[y])
    ids = [f"ISIC_{24306 + i:07d}" for i in range(n)]
    lesions = [f"HAM_{i // 2:07d}" for i in range(n)]
    return SplitPredictions("test", ids, lesions, y.astype(np.int64), probs, CLASSES)


def score_files(out: Path) -> dict:
    """The scorer's command line, JSON output (`-o` goes before the subcommand)."""
    r = subprocess.run([sys.executable, "-m", "isic_challenge_scoring", "-o", "json", "classification",
                        str(out / GROUND_TRUTH), str(out / SUBMISSION)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("seed", [0, 1])
def test_scorer_agrees_with_our_metrics(tmp_path: Path, seed: int) -> None:
    sp = case(seed=seed)
    write_predictions(tmp_path, sp, sp.probs)
    ours = classification_metrics(sp.y, sp.probs)
    theirs = score_files(tmp_path)
    assert theirs["aggregate"]["balanced_accuracy"] == pytest.approx(ours["balanced_accuracy"], abs=1e-9)
    for col in ISIC_COLUMNS:
        assert theirs["per_category"]["auc"][col] == pytest.approx(ours["per_class"][col.lower()]["auc"],
                                                                   abs=1e-9)
    assert theirs["macro_average"]["auc"] == pytest.approx(ours["macro_auc"], abs=1e-9)


@pytest.mark.filterwarnings("ignore:DataFrame.applymap:FutureWarning")
def test_python_api_reads_our_files(tmp_path: Path) -> None:
    from isic_challenge_scoring import ClassificationMetric, ClassificationScore

    sp = case(n=150, seed=3)
    write_predictions(tmp_path, sp, sp.probs)
    score = ClassificationScore.from_file(tmp_path / GROUND_TRUTH, tmp_path / SUBMISSION,
                                          ClassificationMetric.BALANCED_ACCURACY)
    assert score.overall == pytest.approx(classification_metrics(sp.y, sp.probs)["balanced_accuracy"])


def test_tie_rule(tmp_path: Path) -> None:
    """A tied maximum: we count the first maximum (here the true class), the scorer counts it wrong."""
    sp = case(n=60, seed=4)
    i = int(np.flatnonzero(sp.y == 0)[0])  # an akiec row: index 0 is first in our order
    sp.probs[i] = 0.0
    sp.probs[i, [0, 5]] = 0.5  # akiec and nv tied
    write_predictions(tmp_path, sp, sp.probs)
    ours = classification_metrics(sp.y, sp.probs)["balanced_accuracy"]
    theirs = score_files(tmp_path)["aggregate"]["balanced_accuracy"]
    support = int((sp.y == 0).sum())
    assert ours - theirs == pytest.approx(1 / support / 7)
