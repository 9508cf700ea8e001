"""`hamengine train` configuration: file + flags resolve into one TrainConfig (flags given win,
unknown keys are errors), the resolved config is saved, --resume extends a finished run."""
from __future__ import annotations

import json

import builders
import pytest
from click.testing import CliRunner

from hamengine.cli import cli


@pytest.fixture(scope="module")
def pack(train_pack):
    return train_pack


def _source_of(pack):
    """The synthetic source `train_pack` was packed from (builders are idempotent: no rebuild)."""
    return builders.synth_source(pack.parent, 1000, 0, (128, 96))


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


@pytest.mark.slow
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
    # Fewer epochs would change the LR schedule of the run midway: refused, config.json kept.
    lowered = _train("--out", out, "--resume", "--epochs", 1)
    assert lowered.exit_code != 0 and "can only raise --epochs" in lowered.output, lowered.output
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


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
    from hamengine.loaders.pack.writer import pack_dataset

    novel = tmp_path / "noval"
    pack_dataset(PackConfig(source=str(_source_of(pack)), out=str(novel), size=48, val=0.0, test=0.2),
                 progress=False)
    result = _train("--pack", novel, "--model", "hamnet", "--out", tmp_path / "r2", "--device", "cpu", "--epochs", 1)
    assert result.exit_code != 0 and "the val split is empty" in result.output and "--val" in result.output


@pytest.mark.slow
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


@pytest.mark.slow
def test_device_and_unwritable_paths_are_one_line_errors(pack, tmp_path):
    """Through the installed entry point (hamengine.cli:main): no traceback."""
    import subprocess
    import sys

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(["train", "--pack", str(pack), "--out", str(afile), "--model", "hamnet", "--device", "cpu"], str(afile)),
             (["pack", "--source", str(_source_of(pack)), "--out", str(afile / "sub")], str(afile)),
             (["train", "--pack", str(pack), "--out", str(tmp_path / "r"), "--device", "tpu"], "--device 'tpu'")]
    if not __import__("torch").cuda.is_available():
        cases.append((["train", "--pack", str(pack), "--out", str(tmp_path / "r"), "--device", "cuda"],
                      "CUDA is not available"))
    for args, named in cases:
        r = subprocess.run([sys.executable, "-c", "from hamengine.cli import main; main()", *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and named in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])


def _fake_run(pack, run, **config):
    """A run folder as training leaves it, as far as `train --resume` reads it before fit."""
    from hamengine.config import TrainConfig, to_dict
    from hamengine.loaders.pack.records import Pack

    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # never opened: the refusals come first
    saved = TrainConfig(pack=str(pack.resolve()), out=str(run), **config)
    (run / "config.json").write_text(json.dumps(to_dict(saved), indent=2))
    (run / "env.json").write_text(json.dumps({"pack_fingerprint": Pack(pack).fingerprint}))
    return saved


def test_resume_refuses_what_would_change_the_run(pack, tmp_path):
    run = tmp_path / "run"
    _fake_run(pack, run, model="hamnet", epochs=4, lr=1e-3)
    before = (run / "config.json").read_bytes()
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"label_smoothing": 0.0}))
    other = tmp_path / "other-pack"  # another pack: same shards, a different split seed
    other.mkdir()
    manifest = json.loads((pack / "manifest.json").read_text())
    manifest["split"]["seed"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for flags, named in ((["--epochs", 3], "can only raise --epochs"), (["--lr", 0.1], "--lr 0.001 (asked: 0.1)"),
                         (["--aug", "none"], "aug.preset full (asked: none)"), (["--seed", 1], "--seed 0"),
                         (["--config", cfg_file], "--label-smoothing 0.1 (asked: 0.0)"),
                         (["--pack", other], "is not the pack the run was trained on")):
        r = _train("--out", run, "--resume", *flags)
        assert r.exit_code == 2 and named in r.output and "--resume" in r.output, (flags, r.output)
    assert (run / "config.json").read_bytes() == before


def test_resume_may_change_how_and_where_the_run_executes(pack, tmp_path):
    """Device, workers, loader, compile, early stop, more epochs and a moved pack are not the recipe."""
    import shutil

    from hamengine.commands.train import check_resume
    from hamengine.config import TrainConfig
    from hamengine.engine.runtime.run import RunDir

    run = tmp_path / "run"
    saved = _fake_run(pack, run, model="hamnet", epochs=4)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(pack / "manifest.json", moved / "manifest.json")  # the same pack, somewhere else
    asked = TrainConfig(pack=str(moved), out=str(run), model="hamnet", epochs=6, device="cpu", workers=1,
                        loader="torch", compile="off", channels_last=False, early_stop=2, resume=True)
    check_resume(RunDir(run), saved, asked)  # no error


def test_folder_loader_is_not_offered_for_training(pack, tmp_path):
    """`folder` reads the original download (bench loader --source); train reads packs only."""
    r = _train("--pack", pack, "--loader", "folder", "--out", tmp_path / "r", "--device", "cpu")
    assert r.exit_code == 2 and "'folder' is not one of" in r.output, r.output
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"pack": str(pack), "loader": "folder", "device": "cpu"}))
    r = _train("--config", cfg, "--out", tmp_path / "r")
    assert r.exit_code == 2 and "--loader folder" in r.output and "bench loader" in r.output, r.output
    assert not (tmp_path / "r").exists()


def test_train_options_are_the_config_fields_with_their_defaults():
    """Options are declared once (config.py field metadata): every TrainConfig field is an option of
    `train`, and its help says its default."""
    import dataclasses

    import click

    from hamengine.commands.train import train
    from hamengine.config import TrainConfig

    options = {p.name: p for p in train.params if isinstance(p, click.Option)}
    ctx = click.Context(train)
    for f in dataclasses.fields(TrainConfig):
        assert f.name in options, f"TrainConfig.{f.name} is not an option of `hamengine train`"
        decl, text = options[f.name].get_help_record(ctx)
        assert text.startswith(f.metadata["help"]), (decl, text)
        if f.name != "resume":  # a plain flag: off unless given
            assert "[default: " in text, (decl, text)
    assert list(options["loader"].type.choices) == ["auto", "dali", "resident", "torch", "ffcv"]
    assert list(options["optimizer"].type.choices) == ["adamw", "sgd"] and options["optimizer"].default == "adamw"
