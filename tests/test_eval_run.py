"""`hamengine eval / predict / explain / compare / report` on one real run (synth -> pack -> train,
conftest.py's `eval_run`, built once per session). The shared run is only read: a test that writes
into a run (eval, calibrate, report) works on its own copy, so the tests pass in any order."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import copy_of
from click.testing import CliRunner
from PIL import Image

from hamengine.cli import cli
from hamengine.config import CLASSES, ISIC_COLUMNS, TTA
from hamengine.engine.evaluate import metrics as M
from hamengine.engine.evaluate import plots_eval
from hamengine.engine.evaluate.evaluator import EvalOptions, evaluate_run
from hamengine.engine.evaluate.predict import Predictor
from hamengine.engine.runtime.run import RunError
from hamengine.loaders.pack.records import Pack

SIZE = 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str | Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size[0] > 50 and im.size[1] > 50


@pytest.fixture(scope="module")
def trained(eval_pack, eval_run) -> tuple[Path, Path]:
    """(pack, run): 240 synthetic images, packed at 72 px, hamnet trained 2 short epochs at 64 px."""
    return eval_pack, eval_run


@pytest.fixture(scope="module")
def evaluated(eval_run, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the run, evaluated on its test split (flip TTA, 200 bootstrap resamples): (run, metrics).
    The tests read it; none writes into it."""
    run = copy_of(eval_run, tmp_path_factory.mktemp("evaluated") / "run")
    return run, evaluate_run(run, EvalOptions(split="test", tta=TTA.FLIPS, n_boot=200, batch_size=32,
                                              device="cpu"), progress=False)


def read_predictions(path: Path) -> tuple[list[dict], np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
    return rows, probs


def test_eval_outputs_agree(trained, evaluated) -> None:
    pack_dir, _ = trained
    run, m = evaluated
    out = run / "eval-test"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["balanced_accuracy"] == m["balanced_accuracy"]
    for name in ("confusion_matrix", "roc", "reliability", "confidence_hist", "mistakes", "correct"):
        assert_png(out / f"{name}.png")
    # predictions.csv holds every test image once, in pack order, and re-scores to metrics.json
    from hamengine.loaders.pack.records import Pack

    pack = Pack(pack_dir)
    rows, probs = read_predictions(out / "predictions.csv")
    assert [r["image_id"] for r in rows] == pack.keys("test")
    y = np.array([CLASSES.index(r["true"]) for r in rows])
    assert np.array_equal(y, pack.labels("test"))
    assert [r["lesion_id"] for r in rows] == [md["lesion_id"] for md in pack.metadata("test")]
    assert all(r["pred"] == CLASSES[int(p.argmax())] for r, p in zip(rows, probs, strict=True))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    again = M.classification_metrics(y, probs)
    assert again["confusion_matrix"] == on_disk["confusion_matrix"]
    assert again["balanced_accuracy"] == pytest.approx(on_disk["balanced_accuracy"])
    assert again["macro_auc"] == pytest.approx(on_disk["macro_auc"])
    lo, hi = on_disk["ci"]["balanced_accuracy"]
    assert lo <= on_disk["balanced_accuracy"] <= hi
    assert on_disk["ci"]["resampled"] == "lesions"
    assert on_disk["eval"]["tta"] == "flips" and on_disk["eval"]["checkpoint"] == "best.pt"
    # ISIC submission: its column order, same probabilities
    with open(out / "isic2018_submission.csv") as f:
        sub = list(csv.reader(f))
    assert sub[0] == ["image", *ISIC_COLUMNS]
    cols = [CLASSES.index(c.lower()) for c in ISIC_COLUMNS]
    np.testing.assert_array_equal(np.array([[float(v) for v in r[1:]] for r in sub[1:]]), probs[:, cols])


def test_confusion_plot_draws_the_metrics_matrix(trained, evaluated, monkeypatch, tmp_path) -> None:
    """The matrix handed to the plot (and held by the drawn image) is metrics.json's."""
    from hamengine.engine.evaluate import evaluator as E
    from hamengine.engine.evaluate.predict import load_run

    _, run = trained
    seen: dict = {}
    real = plots_eval.plot_confusion

    def spy(cm, classes, path, title=""):
        seen["cm"] = [list(map(int, r)) for r in cm]
        seen["drawn"] = real(cm, classes, path, title)
        return seen["drawn"]

    monkeypatch.setattr(plots_eval, "plot_confusion", spy)
    loaded = load_run(run, device="cpu")
    pack = E.resolve_pack(loaded, None)
    sp = E.collect(loaded, pack, "test", EvalOptions(batch_size=32), progress=False)
    m, probs = E.score(sp, 1.0, 0)
    paths = E.make_plots(tmp_path, sp, probs, m, pack)
    assert seen["cm"] == m["confusion_matrix"]
    assert np.array_equal(seen["drawn"]["counts"], np.array(m["confusion_matrix"]))
    rows = np.array(m["confusion_matrix"]).sum(1, keepdims=True)
    np.testing.assert_allclose(seen["drawn"]["row-normalized"],
                               np.divide(m["confusion_matrix"], rows, where=rows > 0, out=np.zeros((7, 7))))
    for p in paths.values():
        assert_png(p)


def test_tta_views_are_the_square_symmetries() -> None:
    from hamengine.engine.evaluate.predict import predict_batch, tta_views

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    flips = tta_views(x, TTA.FLIPS)
    rot = tta_views(x, TTA.FLIPS_ROT)
    assert len(flips) == 4 and len(rot) == 8
    assert len({v.numpy().tobytes() for v in rot}) == 8  # 8 distinct transforms
    assert {v.numpy().tobytes() for v in flips} <= {v.numpy().tobytes() for v in rot}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 7))
    with torch.no_grad():
        manual = sum(torch.softmax(model(v), 1) for v in flips) / 4
    torch.testing.assert_close(predict_batch(model, x, TTA.FLIPS), manual)


def test_calibrate_saves_temperature_used_by_predict(trained, tmp_path) -> None:
    run = copy_of(trained[1], tmp_path / "run")  # calibration.json is written into the run
    m = evaluate_run(run, EvalOptions(split="val", calibrate=True, n_boot=0, plots=False, device="cpu"),
                     progress=False)
    cal = m["calibration"]
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["temperature"] == pytest.approx(cal["temperature"]) and cal["temperature"] > 0
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-9  # fitted on this split: never worse
    assert cal["nll_after"] == pytest.approx(cal["val_nll_after"], rel=1e-6)
    p = Predictor(run, device="cpu")
    assert p.temperature == pytest.approx(cal["temperature"])
    (run / "calibration.json").unlink()  # without it: uncalibrated
    assert Predictor(run, device="cpu").temperature == 1.0


def test_predict_matches_eval_of_the_packed_copy(trained, evaluated) -> None:
    """A pack JPEG through Predictor (PIL decode + eval transform) ~ the eval loader's probabilities."""
    from hamengine.loaders.pack.records import Pack

    pack_dir, _ = trained
    run, _ = evaluated
    pack = Pack(pack_dir)
    rows, probs = read_predictions(run / "eval-test" / "predictions.csv")
    p = Predictor(run, device="cpu", tta=TTA.FLIPS)
    n = min(16, len(rows))
    mine = p.probabilities([pack.jpeg("test", i) for i in range(n)])
    assert np.abs(mine - probs[:n]).max() < 0.05
    assert (mine.argmax(1) == probs[:n].argmax(1)).mean() >= 0.85


def test_predict_fullres_real_images(trained, fullres70) -> None:
    _, run = trained
    files = sorted(fullres70.glob("HAM10000_images_part_*/*.jpg"))
    assert len(files) == 70
    res = Predictor(run, device="cpu").predict_files(files)
    probs = np.stack(res)  # no errors: every result is an array
    assert probs.shape == (70, 7) and np.isfinite(probs).all()
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_predict_cli_reports_unreadable_and_predicts_the_rest(trained, tmp_path) -> None:
    from hamengine.loaders.pack.records import Pack

    pack_dir, run = trained
    pack = Pack(pack_dir)
    good = tmp_path / "a.jpg"
    good.write_bytes(pack.jpeg("test", 0))
    png = tmp_path / "b.png"
    Image.open(good).resize((333, 517)).save(png)  # other format, other size
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(pack.jpeg("test", 1)[:200])  # truncated JPEG
    missing = tmp_path / "nope.jpg"
    r = CliRunner().invoke(cli, ["predict", str(run), str(good), str(bad), str(png), str(missing),
                                 "--json", "--top-k", "3", "--device", "cpu"])
    assert r.exit_code != 0
    doc = json.loads(r.stdout[: r.stdout.rindex("}") + 1])
    by_name = {Path(x["image"]).name: x for x in doc["results"]}
    assert "error" in by_name["broken.jpg"] and "error" in by_name["nope.jpg"]
    for name in ("a.jpg", "b.png"):
        top = by_name[name]["top"]
        assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
        assert top[0]["name"] and top[0]["dx"] in CLASSES
        assert sum(by_name[name]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert doc["failed"] == 2
    assert "2 of 4" in r.output


def test_explain_cli(trained, tmp_path) -> None:
    from hamengine.loaders.pack.records import Pack

    pack_dir, run = trained
    pack = Pack(pack_dir)
    imgs = []
    for i in range(3):
        imgs.append(tmp_path / f"img{i}.jpg")
        imgs[-1].write_bytes(pack.jpeg("test", i))
    out = tmp_path / "cams"
    r = CliRunner().invoke(cli, ["explain", str(run), *map(str, imgs), "--out", str(out), "--class", "mel",
                                 "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [x["explained"] for x in doc["images"]] == ["mel"] * 3
    for x in doc["images"]:
        assert_png(x["png"])
    assert_png(out / "contact_sheet.png")
    r = CliRunner().invoke(cli, ["explain", str(run), str(imgs[0]), "--out", str(out), "--class", "xyz"])
    assert r.exit_code != 0 and "xyz" in r.output


def test_compare_and_report(evaluated, serve_run, tmp_path) -> None:
    """compare: one row per run, in the order given, each with its own eval's numbers (two different
    runs: the evaluated copy of the eval run and the serve tests' run, on other data). report: a
    self-contained page of the run's figures."""
    run = copy_of(evaluated[0], tmp_path / "eval-run")  # report writes report.md/html into the run
    metrics = {run: evaluated[1], serve_run: json.loads((serve_run / "eval-test" / "metrics.json").read_text())}
    r = CliRunner().invoke(cli, ["compare", str(run), str(serve_run), "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [row["path"] for row in doc["runs"]] == [str(run), str(serve_run)]
    for row, (path, m) in zip(doc["runs"], metrics.items(), strict=True):
        assert row["run"] == path.name
        assert row["balanced_accuracy"] == m["balanced_accuracy"] and row["n"] == m["n"]
        assert row["balanced_accuracy_ci"] == m["ci"]["balanced_accuracy"]
        assert row["recall"]["nv"] == m["per_class"]["nv"]["recall"]
        assert row["params"] > 0 and row["train_img_per_s"] > 0 and row["train_wall_s"] > 0
    # different runs, different rows: other test splits (240 vs 150 images), other training lengths
    assert doc["runs"][0]["n"] != doc["runs"][1]["n"] and doc["runs"][0]["epochs"] == 2
    assert doc["runs"][1]["epochs"] == 1
    assert_png(doc["figure"])

    r = CliRunner().invoke(cli, ["report", str(run), "--json"])
    assert r.exit_code == 0, r.output
    md = (run / "report.md").read_text()
    assert "Not a medical device" in md and "Known limitations" in md
    links = [line[line.index("](") + 2:-1] for line in md.splitlines() if line.startswith("![")]
    assert "eval-test/confusion_matrix.png" in links and "plots/curves.png" in links
    for link in links:
        assert_png(run / link)
    page = (run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(links)  # self-contained
    assert 'src="eval-' not in page and "Not a medical device" in page


def test_errors_name_the_problem(trained, tmp_path) -> None:
    _, run = trained
    r = CliRunner().invoke(cli, ["eval", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "no such run directory" in r.output
    r = CliRunner().invoke(cli, ["eval", str(run), "--pack", str(tmp_path)])
    assert r.exit_code == 1 and "--pack" in r.output
    broken = tmp_path / "run"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.json").write_text((run / "config.json").read_text())
    (broken / "checkpoints" / "best.pt").write_bytes((run / "checkpoints" / "best.pt").read_bytes()[:1000])
    r = CliRunner().invoke(cli, ["predict", str(broken), str(tmp_path / "x.jpg")])
    assert r.exit_code == 1 and "best.pt" in r.output and "truncated or corrupt" in r.output


def test_eval_refuses_a_pack_whose_split_holds_training_images(trained, eval_source, tmp_path) -> None:
    """Re-splitting the same images (another --seed) puts training images into the test split:
    scoring it would inflate every metric. Refused, naming the images; the run's own pack passes;
    when the training pack is gone only --unchecked-pack goes ahead (and says so in metrics.json)."""
    from hamengine.config import PackConfig
    from hamengine.loaders.pack.writer import pack_dataset

    pack_dir = trained[0]
    run = copy_of(trained[1], tmp_path / "run")  # the evaluation of its own pack is written into it
    assert json.loads((run / "env.json").read_text())["pack_fingerprint"] == Pack(pack_dir).fingerprint
    other = tmp_path / "reseeded"
    pack_dataset(PackConfig(source=str(eval_source), out=str(other), size=SIZE + 8, seed=7,
                            workers=2), progress=False)
    opts = dict(split="test", n_boot=0, batch_size=32, device="cpu", plots=False)
    with pytest.raises(RunError, match="were in this run's training split"):
        evaluate_run(run, EvalOptions(pack=str(other), **opts), progress=False)
    own = evaluate_run(run, EvalOptions(**opts), progress=False)
    assert own["eval"]["pack_check"] == "the run's own pack"

    moved = tmp_path / "run-elsewhere"  # the same run whose training pack can no longer be found
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("eval-*"))
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "pack": str(tmp_path / "gone")}))
    with pytest.raises(RunError, match="--unchecked-pack"):
        evaluate_run(moved, EvalOptions(pack=str(other), **opts), progress=False)
    m = evaluate_run(moved, EvalOptions(pack=str(other), unchecked_pack=True, **opts), progress=False)
    assert "NOT checked" in m["eval"]["pack_check"]


def test_a_run_judged_by_its_last_weights_is_scored_and_served_by_them(loader_pack, tmp_path) -> None:
    """--checkpoint last --test-tta flips (the fast recipe's choice): the test evaluation that ends
    training scores last.pt with flips, and eval / predict default to the same; flags override."""
    from builders import trained

    from hamengine.config import CheckpointName
    from hamengine.engine.evaluate.calibration import save_class_bias
    from hamengine.engine.serve.backend import PredictorBackend
    from hamengine.engine.serve.gradcam import explain

    run = trained(loader_pack, tmp_path / "run", model="hamnet", epochs=2, size=48, batch_size=16,
                  loader="resident", max_steps_per_epoch=3, warmup_epochs=0.0,
                  checkpoint=CheckpointName.LAST, test_tta=TTA.FLIPS)
    scored = json.loads((run / "eval-test" / "metrics.json").read_text())["eval"]
    assert scored["checkpoint"] == "last.pt" and scored["tta"] == "flips" and scored["epoch"] == 2
    p = Predictor(run, device="cpu")
    assert p.checkpoint_name == "last.pt" and p.tta == TTA.FLIPS
    served = PredictorBackend(run, device="cpu").describe()
    assert served["checkpoint"] == "last.pt" and served["tta"] == "flips"
    res = CliRunner().invoke(cli, ["eval", str(run), "--split", "val", "--boot", "0", "--no-plots",
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["eval"].items() >= {"checkpoint": "last.pt", "tta": "flips", "epoch": 2}.items()
    # explain (Grad-CAM), no class asked for: it explains the class predict reports (the run's TTA and
    # decision biases), here df forced by a large bias, not the argmax of one unadjusted view
    save_class_bias(run, np.array([-2.0, -2.0, -2.0, 12.0, -2.0, -2.0, -2.0]), {"fitted_on": "test"})
    p = Predictor(run, device="cpu")
    rng = np.random.default_rng(0)
    for _ in range(3):
        e = explain(p, Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)))
        assert e.target == int(e.probs.argmax()) == CLASSES.index("df")
    p = Predictor(run, checkpoint="best", tta="none", device="cpu")
    assert p.checkpoint_name == "best.pt" and p.tta == TTA.NONE
    res = CliRunner().invoke(cli, ["eval", str(run), "--checkpoint", "best", "--tta", "none", "--boot", "0",
                                   "--no-plots", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)
    assert m["eval"]["checkpoint"] == "best.pt" and m["eval"]["tta"] == "none"
    # A run from before the key existed (no `checkpoint` in config.json) is judged by best.pt.
    cfg = json.loads((run / "config.json").read_text())
    del cfg["checkpoint"], cfg["test_tta"]
    (run / "config.json").write_text(json.dumps(cfg))
    p = Predictor(run, device="cpu")
    assert p.checkpoint_name == "best.pt" and p.tta == TTA.NONE
    cfg["checkpoint"] = "middle"
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="checkpoint 'middle' is not one of best, last"):
        Predictor(run, device="cpu")
