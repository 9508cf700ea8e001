"""`hamengine train` configuration: file + flags resolve into one TrainConfig (flags given win,
unknown keys are errors), the resolved config is saved, --resume extends a finished run."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from train_data import small_pack

from hamengine.cli import cli


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return small_pack(tmp_path_factory.getbasetemp() / "train-data")


def _train(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)


def test_unknown_config_key_is_rejected(pack, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"pack": str(pack), "epochz": 3}))
    result = _train("--config", cfg, "--out", tmp_path / "run")
    assert result.exit_code != 0
    assert "epochz" in result.output and "unknown key" in result.output
    assert not (tmp_path / "run").exists()
    bad_value = tmp_path / "bad.toml"
    bad_value.write_text('model = "hamnet"\noptimizer = "adam"\n')
    result = _train("--config", bad_value, "--pack", pack)
    assert result.exit_code != 0 and "optimizer" in result.output and "adamw" in result.output


def test_flags_override_file_and_config_is_saved(pack, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"pack": str(pack), "model": "hamnet", "epochs": 5, "batch_size": 16, "size": 48,
                               "max_steps_per_epoch": 2, "optimizer": "sgd", "out": str(out),
                               "device": "cpu", "aug": {"preset": "crop-flip", "hue": 0.0}}))
    result = _train("--config", cfg, "--epochs", 1, "--size", 32, "--json")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["size"] == 32  # flags given
    assert saved["batch_size"] == 16 and saved["optimizer"] == "sgd" and saved["model"] == "hamnet"  # file
    assert saved["aug"]["preset"] == "crop-flip" and saved["aug"]["hue"] == 0.0
    assert saved["label_smoothing"] == 0.1  # dataclass default: neither file nor flag
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    # The same --out again without --resume is refused (two runs never mix) ...
    result = _train("--config", cfg, "--epochs", 1)
    assert result.exit_code != 0 and "--resume" in result.output
    # ... and --resume continues it from its saved config: only --epochs changes.
    result = _train("--out", out, "--resume", "--epochs", 2)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["size"] == 32 and saved["optimizer"] == "sgd"
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_without_checkpoint_is_a_clear_error(pack, tmp_path):
    result = _train("--pack", pack, "--out", tmp_path / "nothing", "--resume")
    assert result.exit_code != 0 and "last.pt" in result.output and "nothing to resume" in result.output
