"""`hamengine bench tta`: the metrics -> time-to-target computation, the result file, errors, and one
real end-to-end run (baseline through the folder loader, fast through the pack)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hamengine.bench.tta import CLOCK, TTASpec, run_bench_tta, summarize, time_to_targets, versus_baseline
from hamengine.cli import cli
from hamengine.errors import ConfigError

RUN_KEYS = {"recipe", "seed", "run", "epochs", "img_per_s", "eval_s", "best_val_balanced_accuracy",
            "test_balanced_accuracy", "test_balanced_accuracy_ci", "time_to_target", "curve", "error", "loader"}


def _row(epoch: int, acc: float, elapsed: float, val_s: float, img_per_s: float = 100.0) -> dict:
    return {"epoch": epoch, "val_balanced_accuracy": acc, "elapsed_s": elapsed, "val_s": val_s,
            "img_per_s": img_per_s, "epoch_s": 1.0}


def test_time_to_target_excludes_validation_and_is_null_when_never_reached():
    # epoch 1: 10 s wall of which 2 s val -> train clock 8; epoch 2: 25 s wall, 2 + 3 s val -> 20.
    rows = [_row(1, 0.40, 10.0, 2.0, 100.0), _row(2, 0.62, 25.0, 3.0, 300.0), _row(3, 0.55, 40.0, 5.0)]
    got = time_to_targets(rows, [0.5, 0.6, 0.7])
    assert got["curve"] == [[8.0, 0.40], [20.0, 0.62], [30.0, 0.55]]
    assert got["time_to_target"] == {"0.5": 20.0, "0.6": 20.0, "0.7": None}
    assert got["eval_s"] == pytest.approx(10.0)
    assert got["best_val_balanced_accuracy"] == 0.62
    assert got["epochs"] == 3
    assert got["img_per_s"] == pytest.approx(500.0 / 3)


def test_time_to_target_first_crossing_and_empty_run():
    rows = [_row(1, 0.51, 5.0, 1.0), _row(2, 0.49, 9.0, 1.0), _row(3, 0.71, 13.0, 1.0)]
    assert time_to_targets(rows, [0.5, 0.7])["time_to_target"] == {"0.5": 4.0, "0.7": 10.0}
    empty = time_to_targets([], [0.5])
    assert empty["time_to_target"] == {"0.5": None} and empty["curve"] == [] and empty["epochs"] == 0


def test_summarize_means_over_seeds_that_reached_and_skips_failures():
    def run(recipe, seed, t, test, error=None):
        return {"recipe": recipe, "seed": seed, "error": error, "time_to_target": {"0.5": t},
                "best_val_balanced_accuracy": 0.6, "test_balanced_accuracy": test, "img_per_s": 10.0,
                "epochs": 2, "eval_s": 1.0, "train_s": 5.0}

    runs = [run("fast", 0, 10.0, 0.5), run("fast", 1, None, 0.7), run("fast", 2, 99.0, 0.0, error="boom")]
    m = summarize(runs, [0.5])["fast"]
    assert m["time_to_target"] == {"0.5": 10.0} and m["reached"] == {"0.5": 1}
    assert m["seeds"] == 2 and m["failed"] == 1
    assert m["test_balanced_accuracy"] == pytest.approx(0.6)


def test_versus_baseline_pairs_seeds_and_times_the_baselines_best_val():
    def run(recipe, seed, curve, test, error=None):
        return {"recipe": recipe, "seed": seed, "error": error, "curve": curve, "test_balanced_accuracy": test,
                "best_val_balanced_accuracy": max((a for _, a in curve), default=None)}

    runs = [run("baseline", 0, [[100.0, 0.30], [200.0, 0.45], [300.0, 0.40]], 0.40),
            run("baseline", 1, [[100.0, 0.50]], 0.42),
            run("baseline", 2, [[50.0, 0.5]], 0.41, error="boom"),
            run("fast", 0, [[20.0, 0.44], [40.0, 0.46]], 0.55),  # reaches 0.45 at 40 s: 0.2x of 200 s
            run("fast", 1, [[30.0, 0.49]], 0.50),  # never reaches the baseline's 0.50
            run("fast", 2, [[10.0, 0.9]], 0.9)]  # its baseline failed: no pair
    v = versus_baseline(runs)
    assert list(v) == ["fast"]
    s0, s1 = v["fast"]["seeds"]
    assert (s0["seed"], s0["baseline_s"], s0["recipe_s"]) == (0, 200.0, 40.0)
    assert s0["time_ratio"] == pytest.approx(0.2) and s0["test_gain"] == pytest.approx(0.15)
    assert s1["recipe_s"] is None and s1["time_ratio"] is None and s1["test_gain"] == pytest.approx(0.08)
    assert v["fast"]["reached"] == 1 and v["fast"]["time_ratio"] == pytest.approx(0.2)
    assert v["fast"]["test_gain"] == pytest.approx(0.115)
    assert versus_baseline([r for r in runs if r["recipe"] == "fast"]) == {}


def _fake_fit(cfg, opts):
    """Stands in for engine.train.fit: writes the run files a real run leaves (fails for `default`)."""
    if cfg.recipe == "default":
        raise RuntimeError("out of memory")
    run = Path(cfg.out)
    (run / "eval-test").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(_row(e, 0.3 * e, 4.0 * e, 1.0)) + "\n" for e in (1, 2)))
    (run / "eval-test" / "metrics.json").write_text(json.dumps(
        {"balanced_accuracy": 0.55, "ci": {"balanced_accuracy": [0.4, 0.7]},
         "eval": {"checkpoint": "last.pt", "epoch": 2, "tta": "flips"}}))
    return {"test_eval_s": 1.5}


def test_failed_recipe_is_recorded_and_the_others_still_run(loader_pack, tmp_path, monkeypatch):
    import hamengine.bench.tta as train  # run_one calls the `fit` imported there

    monkeypatch.setattr(train, "fit", _fake_fit)
    spec = TTASpec(pack=str(loader_pack), out=str(tmp_path / "tta"), budget="1m", recipes=["default", "fast"],
                   seeds=[0], targets=[0.5])
    result = run_bench_tta(spec)
    failed, ok = result["runs"]
    assert failed["error"] == "RuntimeError: out of memory" and failed["test_balanced_accuracy"] is None
    assert ok["error"] is None and ok["time_to_target"] == {"0.5": 6.0}
    assert ok["test_balanced_accuracy"] == 0.55 and ok["test_balanced_accuracy_ci"] == [0.4, 0.7]
    assert ok["test_eval_s"] == 1.5
    assert ok["test_weights"] == {"checkpoint": "last.pt", "epoch": 2, "tta": "flips"}  # what was scored
    written = json.loads((tmp_path / "tta" / "tta.json").read_text())
    assert written["budget_s"] == 60.0 and written["complete"] is True
    assert len(written["runs"]) == 2 and written["versus_baseline"] == {}
    assert (tmp_path / "tta" / "tta.png").stat().st_size > 0


def test_table_shows_runs_failures_and_means(loader_pack, tmp_path, monkeypatch):
    import hamengine.bench.tta as train  # run_one calls the `fit` imported there
    from hamengine.commands.common import console

    monkeypatch.setattr(train, "fit", _fake_fit)
    monkeypatch.setattr(console, "width", 200)  # one line per table row, whatever the terminal
    res = CliRunner().invoke(cli, ["bench", "tta", "--pack", str(loader_pack), "--out", str(tmp_path / "o"),
                                   "--recipes", "default,fast", "--budget", "1m", "--targets", "0.5"])
    assert res.exit_code == 0, res.output
    assert "default seed 0 failed: RuntimeError: out of memory" in res.output
    assert "6.0 (1/1)" in res.output  # fast's mean time to 0.5, reached by 1 of 1 seeds
    assert "0.550 (0.400-0.700)" in res.output
    assert (tmp_path / "o" / "tta.json").is_file()


def test_baseline_source_reads_the_original_folder(loader_pack, synth_source, tmp_path):
    """The baseline's loaders are the folder loader over --source, so a folder without the pack's
    images cannot feed it; the other recipes read the pack."""
    import shutil

    import torch

    from hamengine.bench.tta import RecordingSource
    from hamengine.config import LoaderConfig

    cfg = LoaderConfig(size=64, batch_size=8, workers=1)
    cpu = torch.device("cpu")
    folder = RecordingSource(str(loader_pack), str(synth_source))
    folder.loader("val", cfg, cpu).close()
    pack = RecordingSource(str(loader_pack))
    pack.loader("val", cfg, cpu).close()
    assert folder.kinds == {"val": "folder"} and pack.kinds["val"] != "folder"
    stripped = Path(shutil.copytree(synth_source, tmp_path / "without-val"))
    val_ids = set(folder.inner.pack.keys("val"))
    removed = [f.unlink() for f in stripped.rglob("*.jpg") if f.stem in val_ids]
    assert removed
    with pytest.raises(ConfigError, match="not in"):
        RecordingSource(str(loader_pack), str(stripped)).loader("val", cfg, cpu)


@pytest.mark.parametrize(("args", "message"), [
    (["--recipes", "fast,turbo"], "unknown turbo"),
    (["--budget", "soon"], "--budget 'soon'"),
    (["--recipes", "baseline"], "pass --source DIR"),
    (["--targets", "0.5,1.5"], "--targets"),
])
def test_cli_errors_name_the_option(loader_pack, tmp_path, args, message):
    res = CliRunner().invoke(cli, ["bench", "tta", "--pack", str(loader_pack), "--out", str(tmp_path / "o"),
                                    "--budget", "1m", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "o").exists()


def test_missing_pack_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a pack"):
        run_bench_tta(TTASpec(pack=str(tmp_path), out=str(tmp_path / "o"), budget="1m", recipes=["fast"]))


@pytest.mark.slow
def test_end_to_end_baseline_reads_the_originals(loader_pack, synth_source, tmp_path):
    out = tmp_path / "tta"
    res = CliRunner().invoke(cli, ["bench", "tta", "--pack", str(loader_pack), "--source", str(synth_source),
                                    "--recipes", "baseline,fast", "--budget", "15s", "--seeds", "0",
                                    "--out", str(out), "--model", "hamnet", "--size", "64", "--device", "cpu",
                                    "--targets", "0.1,0.99", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "tta.json").read_text())
    assert {"budget_s", "clock", "targets", "runs", "recipes", "hardware", "command", "complete",
            "versus_baseline"} <= set(result)
    assert result["clock"] == CLOCK and result["budget_s"] == 15.0 and result["complete"] is True
    (pair,) = result["versus_baseline"]["fast"]["seeds"]  # fast beside the baseline of the same seed
    assert pair["seed"] == 0 and pair["baseline_s"] > 0 and pair["test_gain"] is not None
    by_recipe = {r["recipe"]: r for r in result["runs"]}
    for r in by_recipe.values():
        assert RUN_KEYS <= set(r) and r["error"] is None, r["error"]
        assert r["epochs"] >= 1 and len(r["curve"]) == r["epochs"]
        assert set(r["time_to_target"]) == {"0.1", "0.99"}
        assert 0.0 <= r["test_balanced_accuracy"] <= 1.0 and len(r["test_balanced_accuracy_ci"]) == 2
        assert (Path(r["run"]) / "eval-test" / "metrics.json").is_file() and r["device"] == "cpu"
    assert by_recipe["baseline"]["loader"] == "folder"  # per-file PIL decode of the originals
    assert by_recipe["fast"]["loader"] != "folder"
    assert set(result["recipes"]) == {"baseline", "fast"}
    assert (out / "tta.png").stat().st_size > 0


def test_size_override_keeps_a_progressive_floor_below_it(monkeypatch, tmp_path):
    """--size drops a recipe's progressive floor only when the floor is not below the new size."""
    from hamengine import recipes
    from hamengine.bench.tta import build_config

    monkeypatch.setitem(recipes.RECIPES, "prog", {"size": 128, "progressive_min_size": 96})
    spec = lambda size: TTASpec(pack=str(tmp_path), out=str(tmp_path / "o"), budget="1m",  # noqa: E731
                                overrides={"size": size})
    assert build_config(spec(128), "prog", 0).progressive_min_size == 96
    assert build_config(spec(96), "prog", 0).progressive_min_size == 0
    assert build_config(spec(64), "prog", 0).size == 64


def test_tta_json_keeps_finished_runs_when_the_bench_is_interrupted(loader_pack, tmp_path, monkeypatch):
    """After each run tta.json holds the runs so far (complete: false); an interruption keeps them."""
    import hamengine.bench.tta as train  # run_one calls the `fit` imported there

    calls = []

    def fit_then_interrupt(cfg, opts):
        calls.append(cfg.seed)
        if len(calls) == 2:
            partial = json.loads((tmp_path / "tta" / "tta.json").read_text())
            assert partial["complete"] is False and [r["seed"] for r in partial["runs"]] == [0]
            raise KeyboardInterrupt
        return _fake_fit(cfg, opts)

    monkeypatch.setattr(train, "fit", fit_then_interrupt)
    spec = TTASpec(pack=str(loader_pack), out=str(tmp_path / "tta"), budget="1m", recipes=["fast"],
                   seeds=[0, 1], targets=[0.5])
    with pytest.raises(KeyboardInterrupt):
        run_bench_tta(spec)
    kept = json.loads((tmp_path / "tta" / "tta.json").read_text())
    assert kept["complete"] is False and kept["runs"][0]["test_balanced_accuracy"] == 0.55
    assert not (tmp_path / "tta" / "tta.png").exists()


def test_an_interrupted_run_stops_the_bench(loader_pack, tmp_path, monkeypatch):
    """Ctrl-C inside a run: fit returns interrupted (last.pt kept); the bench records it and stops
    instead of starting the next run."""
    import hamengine.bench.tta as train  # run_one calls the `fit` imported there

    seeds = []

    def fit_interrupted_at_seed_1(cfg, opts):
        seeds.append(cfg.seed)
        return {"interrupted": True} if cfg.seed == 1 else _fake_fit(cfg, opts)

    monkeypatch.setattr(train, "fit", fit_interrupted_at_seed_1)
    spec = TTASpec(pack=str(loader_pack), out=str(tmp_path / "tta"), budget="1m", recipes=["fast"],
                   seeds=[0, 1, 2], targets=[0.5])
    result = run_bench_tta(spec)
    assert seeds == [0, 1] and result["complete"] is False
    assert result["runs"][1]["error"].startswith("interrupted") and result["runs"][0]["error"] is None
    assert json.loads((tmp_path / "tta" / "tta.json").read_text())["complete"] is False
