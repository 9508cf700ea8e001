"""--recipe: TrainConfig defaults < recipe < --config file < flags, recorded in config.json."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hamengine.cli import cli
from hamengine.config import TrainConfig, from_dict
from hamengine.errors import ConfigError
from hamengine.recipes import FAST, RECIPES, apply_recipe


@pytest.fixture()
def captured(monkeypatch):
    """`hamengine train` resolves its config, and fit only records it (no training)."""
    import hamengine.engine.train.trainer as train_mod

    seen = []

    def fake_fit(cfg, opts=None):
        seen.append(cfg)
        return {"run": cfg.out, "test": None}
    monkeypatch.setattr(train_mod, "fit", fake_fit)
    return seen


def _train(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)


def test_every_recipe_builds_a_valid_config():
    for name in RECIPES:
        cfg = from_dict(TrainConfig, apply_recipe(name, {"pack": "p"}))
        cfg.check()
        assert cfg.recipe == name
    fast = from_dict(TrainConfig, apply_recipe("fast", {}))
    assert fast.model == "hamnet" and fast.size == 160 and fast.progressive_min_size == 0
    assert str(fast.schedule) == "onecycle" and fast.ema == 0.999
    assert fast.warmup_epochs == 2.0 and fast.onecycle_peak == 0.0  # the LR peaks at epoch 2
    assert str(fast.checkpoint) == "last" and str(fast.test_tta) == "flips"  # judged by its final EMA weights
    assert fast.budget_side_list() == [112, 128, 160] and fast.budget_min_epochs == 40  # the side fits the host
    sized = from_dict(TrainConfig, apply_recipe("fast", {"size": 128}))
    assert sized.size == 128 and sized.budget_sides is None  # a --size flag is the side
    baseline = from_dict(TrainConfig, apply_recipe("baseline", {}))
    assert baseline.model == "resnet18" and baseline.size == 128 and baseline.amp is False
    assert from_dict(TrainConfig, apply_recipe("default", {})) == TrainConfig()
    with pytest.raises(ConfigError, match="known: default, fast, baseline"):
        apply_recipe("fastest", {})


def test_flags_beat_file_beat_recipe_beat_defaults(captured, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"pack": str(tmp_path), "size": 144, "epochs": 7, "aug": {"hue": 0.0}}))
    result = _train("--recipe", "fast", "--config", cfg_file, "--epochs", 3)
    assert result.exit_code == 0, result.output
    cfg = captured[-1]
    assert cfg.recipe == "fast"
    assert cfg.epochs == 3  # flag over file (7) over recipe (12)
    assert cfg.size == 144  # file over recipe (160)
    assert cfg.model == "hamnet" and cfg.ema == 0.999  # recipe over defaults
    assert cfg.aug.hue == 0.0 and cfg.aug.preset == TrainConfig().aug.preset  # nested: file key only
    assert cfg.optimizer == TrainConfig().optimizer  # default: in neither


def test_recipe_named_in_the_config_file(captured, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"pack": str(tmp_path), "recipe": "baseline", "batch_size": 64}))
    result = _train("--config", cfg_file)
    assert result.exit_code == 0, result.output
    cfg = captured[-1]
    assert cfg.recipe == "baseline" and cfg.batch_size == 64 and cfg.amp is False
    assert str(cfg.balance) == "loss" and cfg.label_smoothing == 0.0 and str(cfg.compile) == "off"
    # A flag names another recipe: it replaces the file's, the file's own keys still win over it.
    result = _train("--config", cfg_file, "--recipe", "fast")
    assert result.exit_code == 0, result.output
    assert captured[-1].recipe == "fast" and captured[-1].batch_size == 64 and captured[-1].amp is True


def test_unknown_recipe_is_a_config_error(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--pack", str(tmp_path), "--recipe", "turbo", "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "turbo" in result.output and "default, fast, baseline" in result.output
    assert not (tmp_path / "run").exists()


def test_help_lists_the_recipes():
    result = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--recipe" in text
    for name in RECIPES:
        assert f"{name}:" in text, name
    assert "hamnet at 160 px" in text and "resnet18 at 128 px" in text  # the descriptions too


def test_fast_values_are_in_one_dict():
    assert apply_recipe("fast", {})["epochs"] == FAST["epochs"]
