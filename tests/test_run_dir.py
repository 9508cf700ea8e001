"""RunDir is the only code that names run files: its readers and the --split check that compare,
report and eval share."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hamengine.cli import cli
from hamengine.engine.evaluate.compare import compare_runs
from hamengine.engine.runtime.run import RunDir, RunError
from hamengine.engine.train.report import write_report
from hamengine.errors import ConfigError


def test_unknown_split_is_refused_before_any_file_is_read(tmp_path):
    with pytest.raises(ConfigError, match="--split 'banana'.*train, val, test"):
        compare_runs([tmp_path / "no-such-run"], split="banana")
    with pytest.raises(ConfigError, match="--split 'banana'"):
        write_report(tmp_path / "no-such-run", split="banana")
    r = CliRunner().invoke(cli, ["report", str(tmp_path), "--split", "banana"])
    assert r.exit_code == 2 and "--split 'banana'" in r.output and "hamengine eval" not in r.output


def test_metrics_reader_drops_a_line_cut_by_a_kill(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"epoch": 1, "val_balanced_accuracy": 0.5})
    run.append_metrics({"epoch": 2, "val_balanced_accuracy": 0.6})
    with open(run.metrics_path, "a", encoding="utf-8") as f:
        f.write('{"epoch": 3, "val_bal')  # kill -9 mid-write
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    assert [r["epoch"] for r in run.truncate_metrics(1)] == [1]
    assert [r["epoch"] for r in run.read_metrics()] == [1]


def test_missing_and_corrupt_eval_say_what_to_run(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunError, match=r"hamengine eval .* --split val"):
        run.read_eval("val")
    run.eval_dir("val").mkdir()
    run.eval_metrics_path("val").write_text("[1, 2]")
    with pytest.raises(RunError, match="expected a JSON object"):
        run.read_eval("val")
    run.eval_metrics_path("val").write_text(json.dumps({"balanced_accuracy": 0.5}))
    assert run.read_eval("val")["balanced_accuracy"] == 0.5
    assert run.read_env() is None  # no env.json: an older or hand-made run, not an error
