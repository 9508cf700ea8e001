"""Per-class decision biases fitted on val: the fit itself, the calibration.json round trip, and the same
adjusted numbers in eval (predictions.csv, the ISIC CSV), predict and serve."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from builders import copy_of
from PIL import Image

from hamengine.config import CLASSES, ISIC_COLUMNS
from hamengine.engine.evaluate import calibration as C
from hamengine.engine.evaluate.evaluator import EvalOptions, evaluate_run, fit_decision
from hamengine.engine.evaluate.predict import Predictor
from hamengine.engine.runtime.run import RunError


def _np_adjust(raw: np.ndarray, t: float, b) -> np.ndarray:
    """Independent of calibration.py: softmax(log(clip(p)) / T + b)."""
    z = np.log(np.clip(raw, 1e-12, None)) / t + np.asarray(b, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _bacc(pred, y) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def _shifted(n: int, seed: int, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels; logits informative, then a known per-class shift added (the bias to undo)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(7, size=n, p=[0.45, 0.2, 0.1, 0.1, 0.07, 0.05, 0.03])
    z = rng.normal(size=(n, 7))
    z[np.arange(n), y] += 2.0
    return z + shift, y


SHIFT = np.array([1.5, 0.8, 0, 0, -0.5, -1.0, -0.8])


def test_fit_recovers_a_known_shift() -> None:
    z, y = _shifted(450, 0, SHIFT)
    b = C.fit_class_bias(z, y, 7)
    assert b.shape == (7,) and abs(b.sum()) < 1e-9
    argmax, oracle = _bacc(z.argmax(1), y), _bacc((z - SHIFT).argmax(1), y)
    fitted = _bacc((z + b).argmax(1), y)
    assert fitted >= argmax and fitted >= oracle - 0.03
    # On fresh data from the same shift, the fitted rule still beats plain argmax.
    z2, y2 = _shifted(4000, 1, SHIFT)
    assert _bacc((z2 + b).argmax(1), y2) > _bacc(z2.argmax(1), y2) + 0.02
    assert np.corrcoef(b, -SHIFT)[0, 1] > 0.8  # it undoes the shift (up to a constant)


@pytest.mark.parametrize("seed", range(6))
def test_fit_never_lowers_balanced_accuracy_on_its_data(seed) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 120))
    z, y = rng.normal(size=(n, 7)), rng.integers(0, 7, n)
    z[np.arange(n), y] += rng.uniform(0, 2)
    b = C.fit_class_bias(z, y, 7, n_boot=5, seed=seed)
    assert _bacc((z + b).argmax(1), y) >= _bacc(z.argmax(1), y)


def test_fit_keeps_zero_when_argmax_is_already_perfect() -> None:
    y = np.arange(70) % 7
    z = np.eye(7)[y] * 5.0
    np.testing.assert_array_equal(C.fit_class_bias(z, y, 7), np.zeros(7))


def test_apply_numpy_and_torch_equal() -> None:
    import torch

    raw = np.random.default_rng(0).dirichlet(np.ones(7), size=9)
    adj = C.Adjustment(1.7, tuple(np.linspace(-1, 1, 7)))
    np.testing.assert_allclose(adj.apply(raw), _np_adjust(raw, 1.7, adj.class_bias), atol=1e-12)
    np.testing.assert_allclose(adj.apply_torch(torch.from_numpy(raw)).numpy(), adj.apply(raw), atol=1e-12)
    assert C.Adjustment().apply(raw) is not None and np.array_equal(C.Adjustment().apply(raw), raw)


def test_old_file_missing_file_and_corrupt_file(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert C.load_adjustment(run) == C.Adjustment()
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.5}))
    assert C.load_adjustment(run) == C.Adjustment(1.5, None) and C.load_temperature(run) == 1.5
    # merging: a bias save keeps T, a temperature save keeps the bias
    C.save_class_bias(run, np.array([0.5, -0.5, 0, 0, 0, 0, 0]), {"fitted_on": "val"})
    C.save_calibration(run, 2.0, {"fitted_on": "val"})
    adj = C.load_adjustment(run, 7)
    assert adj.temperature == 2.0 and adj.class_bias == (0.5, -0.5, 0, 0, 0, 0, 0)
    assert adj.decision == "val-bias"
    with pytest.raises(ValueError, match="class_bias"):
        C.load_adjustment(run, 5)
    (run / "calibration.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"calibration\.json.*(delete|rerun)"):
        C.load_adjustment(run)


def _csv_probs(path: Path, cols: list[str]) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    key = "image_id" if "image_id" in rows[0] else "image"
    return [r[key] for r in rows], np.array([[float(r[c]) for c in cols] for r in rows])


def test_round_trip_eval_predict_use_the_fitted_bias(eval_run, eval_pack, tmp_path) -> None:
    from hamengine.loaders.pack.records import Pack

    run = copy_of(eval_run, tmp_path / "run")
    (run / "calibration.json").unlink(missing_ok=True)
    opts = EvalOptions(split="test", n_boot=0, batch_size=32, device="cpu", plots=False)
    evaluate_run(run, opts, progress=False)
    _, raw = _csv_probs(run / "eval-test" / "predictions.csv", list(CLASSES))
    n = min(8, len(raw))
    pack = Pack(eval_pack)
    raw_pred = Predictor(run, device="cpu").probabilities([pack.jpeg("test", i) for i in range(n)])

    fit = fit_decision(run, EvalOptions(batch_size=32, device="cpu"))
    stored = json.loads((run / "calibration.json").read_text())
    b = stored["class_bias"]
    assert len(b) == len(CLASSES) and stored["bias_info"]["fitted_on"] == "val"
    assert fit["val_balanced_accuracy_after"] >= fit["val_balanced_accuracy_before"]
    t = stored["temperature"]

    m = evaluate_run(run, opts, progress=False)
    assert m["eval"]["decision"] == "val-bias" and list(m["eval"]["class_bias"].values()) == pytest.approx(b)
    ids, adj = _csv_probs(run / "eval-test" / "predictions.csv", list(CLASSES))
    np.testing.assert_allclose(adj, _np_adjust(raw, t, b), atol=1e-9)
    _, sub = _csv_probs(run / "eval-test" / "isic2018_submission.csv", list(ISIC_COLUMNS))
    cols = [CLASSES.index(c.lower()) for c in ISIC_COLUMNS]
    np.testing.assert_allclose(sub, _np_adjust(raw, t, b)[:, cols], atol=1e-9)
    p = Predictor(run, device="cpu")
    assert p.adjustment.class_bias == pytest.approx(tuple(b))
    np.testing.assert_allclose(p.probabilities([pack.jpeg("test", i) for i in range(n)]),
                               _np_adjust(raw_pred, t, b), atol=1e-9)
    from hamengine.engine.train.report import write_report

    write_report(run)
    md = (run / "report.md").read_text()
    assert "decision biases fitted on val" in md and f"{CLASSES[0]} {b[0]:+.2f}" in md
    # --calibrate refits T and keeps the bias
    evaluate_run(run, EvalOptions(split="val", calibrate=True, n_boot=0, batch_size=32, device="cpu",
                                  plots=False), progress=False)
    assert C.load_adjustment(run).class_bias == pytest.approx(tuple(b))


def test_corrupt_calibration_is_a_run_error(eval_run, tmp_path) -> None:
    run = copy_of(eval_run, tmp_path / "run")
    (run / "calibration.json").write_text("[1, 2")
    with pytest.raises(RunError, match="calibration.json"):
        Predictor(run, device="cpu")


def test_serve_applies_the_bias(serve_run, tmp_path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient
    from serve_support import real_or_synthetic_jpeg

    from hamengine.engine.serve.server import create_app

    jpeg = real_or_synthetic_jpeg(None)[0]
    base = Predictor(serve_run, device="cpu")
    raw = base.probabilities([Image.open(io.BytesIO(jpeg))])
    run = copy_of(serve_run, tmp_path / "run")
    b = np.array([0.9, -0.4, 0.3, -0.2, 0.1, -0.5, -0.2])
    C.save_class_bias(run, b, {"fitted_on": "test"})
    t = C.load_adjustment(run).temperature
    with TestClient(create_app(run, device="cpu")) as client:
        r = client.post("/api/predict", files={"image": ("a.jpg", jpeg, "image/jpeg")})
        assert r.status_code == 200, r.text
        got = np.array([r.json()["probabilities"][c] for c in CLASSES])
        info = client.get("/api/model").json()
    assert base.adjustment.identity  # so raw is the model's unadjusted output
    expected = _np_adjust(raw, t, b)
    np.testing.assert_allclose(got, expected[0], atol=1e-6)
    np.testing.assert_allclose(got, Predictor(run, device="cpu").probabilities([Image.open(io.BytesIO(jpeg))])[0],
                               atol=1e-6)
    assert info.get("decision") == "val-bias" or "val-bias" in json.dumps(info)


def test_train_with_decision_val_bias_fits_and_applies_it(train_pack, tmp_path) -> None:
    """--decision val-bias is not a no-op at train time: the end of training fits the biases on val
    (best checkpoint), stores them, and the test evaluation applies them."""
    from rich.console import Console

    from hamengine.config import TrainConfig
    from hamengine.engine.train.trainer import FitOptions, fit

    out = tmp_path / "run"
    cfg = TrainConfig(pack=str(train_pack), model="hamnet", epochs=1, batch_size=16, size=64,
                      max_steps_per_epoch=4, device="cpu", out=str(out), decision="val-bias")
    fit(cfg, FitOptions(console=Console(file=io.StringIO())))
    stored = json.loads((out / "calibration.json").read_text())
    assert len(stored["class_bias"]) == len(CLASSES) and stored["bias_info"]["fitted_on"] == "val"
    m = json.loads((out / "eval-test" / "metrics.json").read_text())
    assert m["eval"]["decision"] == "val-bias"
    assert list(m["eval"]["class_bias"].values()) == pytest.approx(stored["class_bias"])
