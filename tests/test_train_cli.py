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


def test_out_of_range_values_and_empty_val_split_fail_before_training(pack, tmp_path):
    for flags, named in ((["--label-smoothing", 2], "--label-smoothing 2.0 must be in [0, 1)"),
                         (["--ema", 1.5], "--ema 1.5"), (["--epochs", 0], "--epochs 0 must be >= 1"),
                         (["--grad-clip", -1, "--weight-decay", -1], "--weight-decay -1.0 must be >= 0")):
        result = _train("--pack", pack, "--model", "hamnet", "--out", tmp_path / "r", "--device", "cpu", *flags)
        assert result.exit_code != 0 and named in result.output, result.output
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()

    from hamengine.config import PackConfig
    from hamengine.loaders.pack import pack_dataset

    novel = tmp_path / "noval"
    pack_dataset(PackConfig(source=str(pack.parent / "synth-1000"), out=str(novel), size=48, val=0.0, test=0.2),
                 progress=False)
    result = _train("--pack", novel, "--model", "hamnet", "--out", tmp_path / "r2", "--device", "cpu", "--epochs", 1)
    assert result.exit_code != 0 and "the val split is empty" in result.output and "--val" in result.output


def test_resume_cannot_change_the_model_or_lose_its_config(pack, tmp_path):
    out = tmp_path / "run"
    ok = _train("--pack", pack, "--model", "hamnet", "--out", out, "--device", "cpu", "--epochs", 1,
                "--batch-size", 16, "--size", 32, "--max-steps-per-epoch", 2)
    assert ok.exit_code == 0, ok.output
    changed = _train("--out", out, "--resume", "--model", "resnet18")
    assert changed.exit_code != 0 and "--model hamnet" in changed.output and "cannot change" in changed.output
    (out / "config.json").write_text("{not json")
    broken = _train("--out", out, "--resume")
    assert broken.exit_code != 0 and "config.json cannot be read" in broken.output
    (out / "config.json").unlink()
    gone = _train("--out", out, "--resume")
    assert gone.exit_code != 0 and "config.json is missing" in gone.output


def test_device_and_unwritable_paths_are_one_line_errors(pack, tmp_path):
    """Through the installed entry point (hamengine.cli:main): no traceback."""
    import subprocess
    import sys

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(["train", "--pack", str(pack), "--out", str(afile), "--model", "hamnet", "--device", "cpu"], str(afile)),
             (["pack", "--source", str(pack.parent / "synth-1000"), "--out", str(afile / "sub")], str(afile)),
             (["train", "--pack", str(pack), "--out", str(tmp_path / "r"), "--device", "tpu"], "--device 'tpu'")]
    if not __import__("torch").cuda.is_available():
        cases.append((["train", "--pack", str(pack), "--out", str(tmp_path / "r"), "--device", "cuda"],
                      "CUDA is not available"))
    for args, named in cases:
        r = subprocess.run([sys.executable, "-c", "from hamengine.cli import main; main()", *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and named in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
