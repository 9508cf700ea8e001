"""Progressive resizing, the one-cycle LR schedule and --budget, on the real training loop."""
from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from hamengine.config import Schedule, TrainConfig, parse_duration
from hamengine.engine.train import trainer as train_mod
from hamengine.engine.train.optim import lr_at
from hamengine.engine.train.resize import resize_batch, size_for_epoch
from hamengine.engine.train.trainer import FitOptions, fit
from hamengine.errors import ConfigError


def test_size_schedule_ramps_in_multiples_of_32_and_ends_at_size():
    sizes = [size_for_epoch(e, 20, 64, 224, 0.75) for e in range(20)]
    assert sizes[0] == 64 and sizes[-1] == 224
    assert sizes[15:] == [224] * 5  # from 0.75 x 20 epochs on: exactly the target
    assert sizes == sorted(sizes) and all(s % 32 == 0 for s in sizes)
    assert len(set(sizes)) <= (224 - 64) // 32 + 1
    # A size that is no multiple of 32 is still reached exactly at the end; min_size 0 is off.
    assert size_for_epoch(11, 12, 96, 120, 0.75) == 120 and size_for_epoch(0, 12, 96, 120, 0.75) == 96
    assert {size_for_epoch(e, 5, 0, 128, 0.75) for e in range(5)} == {128}
    with pytest.raises(ConfigError, match="progressive-min-size"):
        TrainConfig(size=64, progressive_min_size=16).check()
    with pytest.raises(ConfigError, match="progressive-min-size"):
        TrainConfig(size=64, progressive_min_size=96).check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resize_batch_keeps_dtype_and_memory_format(dtype):
    x = torch.rand(2, 3, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    y = resize_batch(x, 32)
    assert y.shape == (2, 3, 32, 32) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y.float().mean(), x.float().mean(), atol=0.02)  # bilinear: the mean is kept
    assert resize_batch(x, 64) is x


def test_onecycle_rises_then_falls_linearly_to_zero():
    cfg = TrainConfig(epochs=10, schedule=Schedule.ONECYCLE, warmup_epochs=1.0)
    def f(i):
        return lr_at(i, cfg, cfg.epochs, 10)
    # 100 steps, warm-up max(1, 0.2 x 10) = 2 epochs = 20 steps
    vals = [f(i) for i in range(100)]
    peak = vals.index(max(vals))
    assert peak == 19 and vals[19] == 1.0
    assert all(a < b for a, b in zip(vals[:20], vals[1:20], strict=False))
    assert all(a > b for a, b in zip(vals[20:], vals[21:], strict=False))
    assert vals[-1] < 0.02
    assert abs((vals[40] - vals[60]) - (vals[60] - vals[80])) < 1e-9  # linear decay


def test_onecycle_peak_moves_the_peak_and_keeps_the_warmup_floor():
    early = TrainConfig(epochs=40, schedule=Schedule.ONECYCLE, warmup_epochs=2.0, onecycle_peak=0.0)
    vals = [lr_at(i, early, 40, 10) for i in range(400)]
    assert vals.index(max(vals)) == 19  # --warmup-epochs 2 alone: the peak at epoch 2 (FFCV's)
    later = TrainConfig(epochs=40, schedule=Schedule.ONECYCLE, warmup_epochs=2.0, onecycle_peak=0.1)
    vals = [lr_at(i, later, 40, 10) for i in range(400)]
    assert vals.index(max(vals)) == 39 and vals[-1] < 0.01  # 10% of 40 epochs; still 0 at the end
    with pytest.raises(ConfigError, match="--onecycle-peak"):
        TrainConfig(onecycle_peak=1.0).check()


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    for bad in ("soon", "10 minutes", "0s", ""):
        with pytest.raises(ConfigError, match="--budget"):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="--budget"):
        TrainConfig(budget="ten minutes").check()


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_progressive_training_resizes_train_batches(train_pack, tmp_path, monkeypatch):
    seen: list[tuple[int, ...]] = []
    real = train_mod.resize_batch

    def spy(images, side):
        out = real(images, side)
        seen.append(tuple(out.shape[-2:]))
        return out
    monkeypatch.setattr(train_mod, "resize_batch", spy)
    out = tmp_path / "run"
    cfg = TrainConfig(pack=str(train_pack), model="hamnet", epochs=3, batch_size=16, size=64,
                      progressive_min_size=32, progressive_end=0.5, max_steps_per_epoch=2, device="cpu",
                      out=str(out))
    summary = fit(cfg, FitOptions(console=Console(file=io.StringIO()), test_eval=False))
    assert summary["epochs"] == 3
    rows = _rows(out)
    expected = [size_for_epoch(e, 3, 32, 64, 0.5) for e in range(3)]
    assert expected == [32, 32, 64]
    assert [r["train_size"] for r in rows] == expected
    assert seen == [(s, s) for s in expected for _ in range(2)]  # what the model was given
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and all(r["val_s"] > 0 for r in rows)
    assert elapsed[-1] >= sum(r["epoch_s"] + r["val_s"] for r in rows)


@pytest.mark.slow  # about 40 s: it spends its budget
def test_budget_plans_epochs_and_ends_with_the_test_evaluation(train_pack, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(pack=str(train_pack), model="hamnet", epochs=1, batch_size=16, size=64,
                      max_steps_per_epoch=3, device="cpu", out=str(out), budget="40s")
    summary = fit(cfg, FitOptions(console=Console(file=io.StringIO())))
    plan = json.loads((out / "budget.json").read_text())
    assert plan["budget_s"] == 40 and plan["epochs"] >= 1 and "64" in plan["train_img_per_s"]
    rows = _rows(out)
    # Re-planned after epoch 1, again after epoch 2 (steady state) and once more after epoch
    # max(3, 10% of the plan) from their measured cost, while those epochs ran.
    after = plan["replanned_after"]
    assert after[:2] == [1, 2][:len(rows)] and plan["epoch_scale"] >= 0.5
    assert len(after) <= 3 and all(3 <= d <= len(rows) for d in after[2:])
    assert plan["deadline_s"] <= 40 - plan["test_s"]  # the test evaluation's time is reserved
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == plan["epochs"] and saved["budget"] == "40s"
    assert 1 <= len(rows) <= plan["epochs"]
    assert summary["test"]["n"] > 0  # the test evaluation ran after the (possibly cut) training


def test_replan_is_due_after_epochs_1_and_2_then_once_about_10_percent_in():
    from hamengine.engine.train.budget import BudgetPlan, replan_due

    plan = BudgetPlan(budget_s=1200, setup_s=1, epochs=80, train_img_per_s={128: 100.0}, eval_img_per_s=500.0,
                      val_s=1.0, test_s=10.0, planned_s=1000.0)
    assert [d for d in range(1, 20) if replan_due(plan, d)] == [1, 2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    plan.replanned_after = [1, 2]
    assert replan_due(plan, 8) and not replan_due(plan, 7)
    plan.replanned_after = [1, 2, 8]  # the late re-plan happened: no more
    assert not any(replan_due(plan, d) for d in range(3, 80))
    short = BudgetPlan(budget_s=60, setup_s=1, epochs=5, train_img_per_s={64: 100.0}, eval_img_per_s=500.0,
                       val_s=1.0, test_s=2.0, planned_s=50.0, replanned_after=[1, 2])
    assert replan_due(short, 3)  # a short plan: epoch 3 at the earliest


# ---------------------------------------------------------------- --budget-sides

def _side_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"model": "hamnet", "size": 160, "budget": "20m", "budget_sides": "112,128,160", **kw})


def _rates(at_160: float):
    """img/s falling with the pixel count, as a conv net's step time grows with it."""
    return lambda side: at_160 * (160 / side) ** 2


def test_budget_side_is_the_largest_that_affords_enough_epochs():
    from hamengine.engine.train.budget import choose_side

    # 2,108 train + 453 val images: at 155 img/s (160 px, a host with native bf16) ~64 epochs
    fast = choose_side(_side_cfg(), 2108, 453, _rates(155.0))
    assert fast["size"] == 160 and fast["estimated_epochs"]["160"] >= 40
    # ~45 img/s at 160 px (fp32 on an AVX2-only host): 160 affords ~18 epochs, 128 ~29, 112 ~38
    slow = choose_side(_side_cfg(), 2108, 453, _rates(45.0))
    assert slow["size"] == 112 and "no side reaches 40" in slow["why"]
    mid = choose_side(_side_cfg(budget_min_epochs=25), 2108, 453, _rates(45.0))
    assert mid["size"] == 128
    # estimated epochs grow as the side shrinks, and the record names every side weighed
    est = slow["estimated_epochs"]
    assert est["112"] > est["128"] > est["160"] and slow["sides"] == [112, 128, 160]


def test_budget_sides_keep_size_where_nothing_was_measured():
    from hamengine.engine.train.budget import choose_side

    gpu = choose_side(_side_cfg(), 2108, 453, lambda side: None)
    assert gpu["size"] == 160 and "kept" in gpu["why"]


@pytest.mark.parametrize("sides", ["", "abc", "16,128"])
def test_malformed_budget_sides_are_refused_naming_the_option(sides):
    from hamengine.errors import ConfigError

    with pytest.raises(ConfigError, match="--budget-sides"):
        _side_cfg(budget_sides=sides).check()


def test_a_size_flag_turns_the_recipe_side_choice_off(monkeypatch):
    import hamengine.recipes as recipes

    monkeypatch.setitem(recipes.RECIPES, "sided", {"size": 160, "budget_sides": "112,128,160"})
    assert recipes.apply_recipe("sided", {})["budget_sides"] == "112,128,160"
    assert "budget_sides" not in recipes.apply_recipe("sided", {"size": 96})
    assert recipes.apply_recipe("sided", {"size": 96, "budget_sides": "64,96"})["budget_sides"] == "64,96"


@pytest.mark.slow  # about 40 s: it spends its budget
def test_budget_sides_train_at_the_chosen_side(train_pack, tmp_path):
    """End to end: the side comes from the measured plan, the loaders and config.json follow it,
    and budget.json records the choice."""
    out = tmp_path / "run"
    cfg = TrainConfig(pack=str(train_pack), model="hamnet", epochs=1, batch_size=16, size=64,
                      max_steps_per_epoch=3, device="cpu", out=str(out), budget="40s", budget_sides="32,48,64",
                      budget_min_epochs=100_000)  # no side affords that many: the smallest is chosen
    fit(cfg, FitOptions(console=Console(file=io.StringIO())))
    plan = json.loads((out / "budget.json").read_text())
    assert plan["side_choice"]["size"] == 32 and set(plan["side_choice"]["img_per_s"]) == {"32", "48", "64"}
    assert json.loads((out / "config.json").read_text())["size"] == 32
    assert {r["train_size"] for r in _rows(out)} == {32}
