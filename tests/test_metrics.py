"""Metrics against scikit-learn, lesion bootstrap, calibration error and temperature scaling."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from hamengine.config import CLASSES
from hamengine.engine.evaluate import calibration, metrics
from hamengine.engine.runtime.run import RunDir

C = len(CLASSES)


def random_case(n: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels with HAM10000-like imbalance and softmax probabilities carrying some signal."""
    rng = np.random.default_rng(seed)
    prior = np.array([327, 514, 1099, 115, 1113, 6705, 142], dtype=float)
    y = rng.choice(C, size=n, p=prior / prior.sum())
    y[:C] = np.arange(C)  # every class present
    logits = rng.normal(size=(n, C)) + signal * np.eye(C)[y]
    return y, calibration.softmax_t(logits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn(seed: int) -> None:
    y, p = random_case(600, seed)
    m = metrics.classification_metrics(y, p)
    pred = p.argmax(1)
    labels = list(range(C))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["weighted_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="weighted"))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p, labels=labels))
    assert m["brier"] == pytest.approx(np.mean(np.sum((p - np.eye(C)[y]) ** 2, 1)))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    cm = np.array(m["confusion_matrix"])
    for c, dx in enumerate(CLASSES):
        pc = m["per_class"][dx]
        assert pc["precision"] == pytest.approx(prec[c])
        assert pc["recall"] == pytest.approx(rec[c])
        assert pc["f1"] == pytest.approx(f1[c])
        assert pc["support"] == sup[c]
        assert pc["auc"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
        tn = cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]
        assert pc["specificity"] == pytest.approx(tn / (cm.sum() - cm[c].sum()))
    # melanoma sensitivity at >= 90% specificity: brute force over every threshold
    mel = CLASSES.index("mel")
    s, pos = p[:, mel], y == mel
    best = max(np.mean(s[pos] >= t) for t in np.r_[s, np.inf] if np.mean(s[~pos] >= t) <= 0.1 + 1e-12)
    assert m["mel_sensitivity_at_90_spec"] == pytest.approx(best)
    assert m["mel_sensitivity_at_80_spec"] >= m["mel_sensitivity_at_90_spec"]
    json.dumps(m, allow_nan=False)  # plain JSON, no NaN


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_class_excluded_from_auc() -> None:
    y, p = random_case(400, 3)
    df = CLASSES.index("df")
    keep = y != df
    y, p = y[keep], p[keep]
    m = metrics.classification_metrics(y, p, n_boot=50)
    assert m["per_class"]["df"]["auc"] is None and m["per_class"]["df"]["recall"] is None
    assert m["auc_excluded"] == ["df"]
    others = [c for c in range(C) if c != df]
    assert m["macro_auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in others]))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))
    json.dumps(m, allow_nan=False)


def test_weighted_auc_matches_resampled_sklearn() -> None:
    y, p = random_case(300, 4)
    p = np.round(p, 2)  # create ties
    rng = np.random.default_rng(0)
    w = rng.integers(0, 3, size=(1, len(y))).astype(float)
    idx = np.repeat(np.arange(len(y)), w[0].astype(int))
    for c in range(C):
        got = metrics._weighted_auc(w, (y == c).astype(float), p[:, c])[0]
        assert got == pytest.approx(skm.roc_auc_score(y[idx] == c, p[idx, c]))
    ba = metrics.balanced_accuracy(y, p.argmax(1), C, weights=w)[0]
    assert ba == pytest.approx(skm.balanced_accuracy_score(y[idx], p[idx].argmax(1)))


def test_bootstrap_contains_estimate_and_narrows() -> None:
    widths = []
    for n in (200, 3000):
        y, p = random_case(n, 5)
        m = metrics.classification_metrics(y, p, n_boot=300, seed=1)
        for key in ("balanced_accuracy", "macro_auc"):
            lo, hi = m["ci"][key]
            assert lo <= m[key] <= hi
        widths.append(m["ci"]["balanced_accuracy"][1] - m["ci"]["balanced_accuracy"][0])
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_resamples_lesions_not_images() -> None:
    # every lesion photographed 6 times (identical predictions): lesion resampling must give about the
    # interval of the 300 distinct lesions, image resampling a much narrower (over-confident) one.
    y, p = random_case(300, 6)
    y6, p6 = np.repeat(y, 6), np.repeat(p, 6, axis=0)
    lesions = np.repeat([f"HAM_{i:07d}" for i in range(300)], 6)
    by_lesion = metrics.classification_metrics(y6, p6, lesion_ids=lesions, n_boot=400)["ci"]
    by_image = metrics.classification_metrics(y6, p6, n_boot=400)["ci"]
    distinct = metrics.classification_metrics(y, p, n_boot=400)["ci"]
    width = lambda ci: ci["macro_auc"][1] - ci["macro_auc"][0]  # noqa: E731
    assert by_lesion["n_groups"] == 300
    assert width(by_image) < 0.6 * width(by_lesion)
    assert width(by_lesion) == pytest.approx(width(distinct), rel=0.3)


def test_ece_near_zero_when_calibrated() -> None:
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.full(C, 0.3), size=20000)
    y = np.array([rng.choice(C, p=row) for row in p])  # labels drawn from the predicted distribution
    m = metrics.classification_metrics(y, p)
    assert m["ece"] < 0.02
    bins = metrics.reliability_bins(p, y)
    assert sum(bins["count"]) == len(y) and len(bins["count"]) == metrics.ECE_BINS
    # the same predictions made over-confident are badly calibrated
    sharp = calibration.softmax_t(calibration.log_probs(p), 0.3)
    assert metrics.classification_metrics(y, sharp)["ece"] > 0.1


def test_temperature_scaling_fixes_overconfidence() -> None:
    rng = np.random.default_rng(8)
    p = rng.dirichlet(np.full(C, 0.5), size=6000)
    y = np.array([rng.choice(C, p=row) for row in p])
    logits = 3.0 * calibration.log_probs(p)  # true temperature 3: over-confident
    val, test = slice(0, 3000), slice(3000, None)
    t = calibration.fit_temperature(logits[val], y[val])
    assert t == pytest.approx(3.0, rel=0.15)
    before = metrics.classification_metrics(y[test], calibration.softmax_t(logits[test]))
    after = metrics.classification_metrics(y[test], calibration.softmax_t(logits[test], t))
    assert after["nll"] < before["nll"] - 0.05
    assert after["ece"] < before["ece"]
    assert after["accuracy"] == before["accuracy"]  # temperature never changes the argmax


def test_calibration_file_roundtrip(tmp_path) -> None:
    assert calibration.load_temperature(tmp_path) == 1.0
    calibration.save_calibration(tmp_path, 1.7, {"fitted_on": "val"})
    assert calibration.load_temperature(tmp_path) == pytest.approx(1.7)
    RunDir(tmp_path).calibration.write_text("{not json")
    with pytest.raises(ValueError, match="calibration.json"):
        calibration.load_temperature(tmp_path)


def test_bad_inputs_are_explained() -> None:
    with pytest.raises(ValueError, match="shape"):
        metrics.classification_metrics(np.zeros(3, int), np.ones((3, 5)) / 5)
    with pytest.raises(ValueError, match="labels"):
        metrics.classification_metrics(np.array([0, 9]), np.ones((2, C)) / C)
