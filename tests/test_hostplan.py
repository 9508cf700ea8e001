"""The execution plan measured on the host (engine/runtime/hostplan.py, engine/execution.resolve_execution):
`auto` follows the probe, flags override it, the probe's table is cached, and every run records and
prints what it chose. Stub probes stand in for timings, so no test depends on this CPU's speed and
none asserts one."""
from __future__ import annotations

import io
import json

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from hamengine.cli import cli
from hamengine.config import CompileMode, LoaderKind, Precision, TrainConfig
from hamengine.engine.runtime import hostplan
from hamengine.engine.runtime.execution import BF16_MIN_GAIN, RunShape, resolve_execution
from hamengine.engine.runtime.hostplan import Candidate, probe_table


class StubProbe:
    """Reports fixed img/s per precision (channels_last `cl_gain` x NCHW) and counts its calls."""

    def __init__(self, fp32: float, bf16: float, cl_gain: float = 1.0):
        self.rates = {Precision.FP32: fp32, Precision.BF16: bf16}
        self.cl_gain = cl_gain
        self.calls = 0

    def __call__(self, model, size, batch, candidates):
        self.calls += 1
        return {c.name: self.rates[c.precision] * (self.cl_gain if c.channels_last else 1.0) for c in candidates}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty plan cache for this test alone."""
    monkeypatch.setenv("HAMENGINE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / hostplan.CACHE_FILE


def cpu_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"model": "hamnet", "size": 64, "batch_size": 16, "device": "cpu", **kw})


def test_auto_runs_fp32_where_bf16_measures_slower(cache):
    ex = resolve_execution(cpu_cfg(), probe=StubProbe(fp32=100, bf16=6))  # an emulated-bf16 host
    assert ex.amp_dtype is None and ex.precision == Precision.FP32
    assert ex.plan.why["amp"].startswith("bf16 0.06x fp32 here")
    assert ex.explain()[0].startswith("amp auto -> fp32 (bf16 0.06x fp32 here")


def test_auto_runs_bf16_where_it_measures_faster(cache):
    ex = resolve_execution(cpu_cfg(), probe=StubProbe(fp32=100, bf16=180))
    assert ex.amp_dtype == torch.bfloat16
    assert ex.explain()[0] == "amp auto -> bf16 (bf16 1.80x fp32 here)"


def test_bf16_must_clear_the_bar_not_just_win(cache):
    just_faster = resolve_execution(cpu_cfg(), probe=StubProbe(fp32=100, bf16=100 * BF16_MIN_GAIN * 0.95))
    assert just_faster.amp_dtype is None


@pytest.mark.parametrize("cl_gain, expected", [(1.3, True), (0.8, False)])
def test_auto_memory_format_is_the_faster_one(cache, cl_gain, expected):
    ex = resolve_execution(cpu_cfg(), probe=StubProbe(fp32=100, bf16=50, cl_gain=cl_gain))
    assert ex.channels_last is expected and ex.amp_dtype is None
    assert ex.loader_config(cpu_cfg()).memory_format.value == ("channels_last" if expected else "contiguous")


@pytest.mark.parametrize("flags, amp_dtype, channels_last", [
    ({"amp": False}, None, None),  # --no-amp: fp32 even where bf16 measures 2x
    ({"amp_dtype": Precision.FP32}, None, None),
    ({"amp_dtype": Precision.FP16}, torch.float16, None),
    ({"channels_last": True}, torch.bfloat16, True),
    ({"channels_last": False, "amp_dtype": Precision.BF16}, torch.bfloat16, False),
])
def test_forcing_flags_override_auto(cache, flags, amp_dtype, channels_last):
    probe = StubProbe(fp32=100, bf16=200, cl_gain=0.5)
    ex = resolve_execution(cpu_cfg(**flags), probe=probe)
    assert ex.amp_dtype == amp_dtype
    if channels_last is not None:
        assert ex.channels_last is channels_last
    amp_line, format_line = ex.explain()[:2]  # "amp -> ..." when forced, "amp auto -> ..." when measured
    assert amp_line.startswith("amp ->") == ("amp" in flags or "amp_dtype" in flags)
    assert format_line.startswith("channels_last ->") == ("channels_last" in flags)


def test_forced_bf16_is_kept_where_it_measures_slower(cache):
    probe = StubProbe(fp32=100, bf16=5)
    ex = resolve_execution(cpu_cfg(amp_dtype=Precision.BF16, channels_last=False), probe=probe)
    assert ex.amp_dtype == torch.bfloat16 and list(ex.plan.img_per_s) == ["bf16/NCHW"]  # timed, not chosen
    assert ex.explain()[0] == "amp -> bf16 (--amp-dtype bf16)"


def test_the_probe_runs_once_per_shape_then_the_cache_answers(cache):
    probe = StubProbe(fp32=100, bf16=6)
    first = resolve_execution(cpu_cfg(), probe=probe)
    second = resolve_execution(cpu_cfg(), probe=probe)
    assert probe.calls == 1 and first.plan.cached is False and second.plan.cached is True
    assert second.amp_dtype is None and second.plan.img_per_s == first.plan.img_per_s
    resolve_execution(cpu_cfg(size=96), probe=probe)  # another side: another measurement
    assert probe.calls == 2 and len(json.loads(cache.read_text())) == 2


def test_inference_and_training_share_a_shape_entry(cache):
    """Inference asks for the two fp32 candidates; a later training run measures only the bf16 ones."""
    probe = StubProbe(fp32=100, bf16=6)
    resolve_execution(cpu_cfg(), inference=True, probe=probe)
    train = resolve_execution(cpu_cfg(), probe=probe)
    assert probe.calls == 2 and train.plan.cached is False and len(train.plan.img_per_s) == 4
    assert resolve_execution(cpu_cfg(), inference=True, probe=probe).plan.cached is True and probe.calls == 2
    assert len(json.loads(cache.read_text())) == 1


def test_a_damaged_cache_is_measured_again_and_rewritten(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    probe = StubProbe(fp32=100, bf16=6)
    assert resolve_execution(cpu_cfg(), probe=probe).plan.cached is False
    assert probe.calls == 1 and len(json.loads(cache.read_text())) == 1


def test_compile_auto_on_cpu_only_when_the_run_can_pay_for_it(cache):
    probe = StubProbe(fp32=100, bf16=6)
    short = resolve_execution(cpu_cfg(), shape=RunShape(images=100 * 60), probe=probe)  # ~1 min of steps
    long = resolve_execution(cpu_cfg(), shape=RunShape(images=100 * 3600), probe=probe)  # ~1 hour
    budget = resolve_execution(cpu_cfg(), shape=RunShape(budget_s=1200), probe=probe)
    unknown = resolve_execution(cpu_cfg(), probe=probe)
    assert (short.compile, long.compile, budget.compile, unknown.compile) == (False, True, True, False)
    forced = resolve_execution(cpu_cfg(compile=CompileMode.OFF), shape=RunShape(images=100 * 3600), probe=probe)
    assert not forced.compile and "compile -> off (--compile off)" in forced.explain()


def test_inference_runs_fp32_eager_with_the_measured_format(cache):
    ex = resolve_execution(cpu_cfg(), inference=True, probe=StubProbe(fp32=100, bf16=400, cl_gain=1.5))
    assert ex.amp_dtype is None and not ex.compile and ex.channels_last


def test_the_real_probe_times_every_candidate(cache):
    """The measurement itself (a tiny side, so it takes a second): one positive rate per candidate."""
    candidates = [Candidate(p, cl) for p in (Precision.FP32, Precision.BF16) for cl in (False, True)]
    table, cached = probe_table("hamnet", 32, 4, candidates)
    assert not cached and set(table) == {c.name for c in candidates} and all(v > 0 for v in table.values())
    assert probe_table("hamnet", 32, 4, candidates) == (table, True)


def test_doctor_prints_the_plan_for_this_host(cache):
    stub = StubProbe(fp32=113, bf16=7)
    candidates = [Candidate(p, cl) for p in (Precision.FP32, Precision.BF16) for cl in (False, True)]
    probe_table("hamnet", 128, 32, candidates, stub)  # doctor's shape, answered from the cache
    res = CliRunner().invoke(cli, ["doctor", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)["plan"]
    assert plan["amp_dtype"] == "fp32" and plan["plan"]["probe_cached"] is True
    assert plan["plan"]["probe_img_per_s"]["bf16/NCHW"] == 7
    assert plan["plan"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    text = CliRunner().invoke(cli, ["doctor", "--device", "cpu"])
    assert text.exit_code == 0 and "amp auto -> fp32 (bf16 0.06x fp32 here" in text.output
    assert "fp32/NCHW" in text.output and "chosen" in text.output


def test_a_run_records_and_prints_its_plan(loader_pack, tmp_path, cache):
    """A real (tiny) training run: env.json holds the choice, the host and the probe's table; the
    train header says what auto chose and why."""
    from hamengine.engine.train.trainer import FitOptions, fit

    stub = StubProbe(fp32=100, bf16=6, cl_gain=1.2)
    cfg = cpu_cfg(pack=str(loader_pack), size=32, epochs=1, max_steps_per_epoch=2, loader=LoaderKind.RESIDENT,
                  out=str(tmp_path / "run"))
    probe_table(cfg.model, cfg.size, cfg.batch_size,
                [Candidate(p, cl) for p in (Precision.FP32, Precision.BF16) for cl in (False, True)], stub)
    out = io.StringIO()
    fit(cfg, FitOptions(console=Console(file=out, width=200), test_eval=False))
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["amp_dtype"] == "fp32" and env["channels_last"] is True and env["compile"] is False
    plan = env["plan"]
    assert plan["probe_img_per_s"]["bf16/NCHW"] == 6 and plan["probe_cached"] is True
    assert set(plan["cpu_flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert plan["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and plan["cpu_model"]
    printed = out.getvalue()
    assert "amp auto -> fp32 (bf16 0.06x fp32 here" in printed
    assert "channels_last auto -> channels_last (channels_last 1.20x NCHW at fp32 here)" in printed


@pytest.mark.parametrize("bf16, expected", [(6, "fp32"), (200, "bf16")])
def test_bench_loader_dtype_auto_follows_the_plan(cache, bf16, expected):
    """`bench loader --dtype auto`: batches in the precision `train` would use for hamnet here."""
    from hamengine.bench.loader import LoaderBench, resolve_bench_dtype

    b = LoaderBench(pack="unused", kinds=["resident"], size=48, batch_size=8, device="cpu")
    candidates = [Candidate(p, cl) for p in (Precision.FP32, Precision.BF16) for cl in (False, True)]
    probe_table("hamnet", 48, 8, candidates, StubProbe(fp32=100, bf16=bf16))
    dtype, memory_format, why = resolve_bench_dtype(b)
    assert dtype == expected and memory_format == "contiguous" and why.startswith(f"dtype auto -> {expected}")
    assert resolve_bench_dtype(LoaderBench(pack="unused", kinds=["resident"], dtype="fp16")) == ("fp16", "auto", None)


def test_a_resumed_run_keeps_the_plan_its_env_json_records(cache):
    """Re-measured today bf16 would lose, but a run that started in bf16 ends in bf16 (and an old
    run's NCHW stays NCHW: a --deterministic resume stays bit-exact)."""
    probe = StubProbe(fp32=100, bf16=6, cl_gain=1.5)
    ex = resolve_execution(cpu_cfg(), probe=probe, kept={"amp_dtype": "bfloat16", "channels_last": False})
    assert ex.amp_dtype == torch.bfloat16 and ex.channels_last is False
    assert ex.explain()[:2] == ["amp -> bf16 (kept from the run's env.json on --resume)",
                                "channels_last -> NCHW (kept from the run's env.json on --resume)"]
    forced = resolve_execution(cpu_cfg(amp=False), probe=probe, kept={"amp_dtype": "bfloat16"})
    assert forced.amp_dtype is None  # a forcing flag is not overridden by what the run did before


def test_a_failing_probe_falls_back_to_fp32_nchw_and_says_why(cache):
    def broken(*_args):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    with pytest.warns(UserWarning, match="probe failed"):
        ex = resolve_execution(cpu_cfg(), probe=broken)
    assert ex.amp_dtype is None and ex.channels_last is False
    assert ex.plan.why["amp"].startswith("probe failed (RuntimeError: DefaultCPUAllocator")


def test_a_fully_forced_pair_is_still_timed_for_the_compile_rule(cache):
    probe = StubProbe(fp32=100, bf16=6)
    ex = resolve_execution(cpu_cfg(amp=False, channels_last=True), shape=RunShape(images=100 * 3600), probe=probe)
    assert probe.calls == 1 and list(ex.plan.img_per_s) == ["fp32/channels_last"] and ex.compile
