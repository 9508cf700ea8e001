"""`hamengine pack` options a user can get wrong: each is refused or explained, never taken silently."""
from __future__ import annotations

import builders
import pytest
from click.testing import CliRunner

from hamengine.cli import cli


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """30 images of 64x48 px (shorter side 48)."""
    return builders.noise_source(tmp_path_factory.mktemp("misuse") / "src", n=30, size=(64, 48))


def _pack(*args):
    return CliRunner().invoke(cli, ["pack", *map(str, args)], catch_exceptions=False)


def test_negative_workers_are_refused(small_source, tmp_path):
    r = _pack("--source", small_source, "--out", tmp_path / "p", "--workers", -1)
    assert r.exit_code != 0 and "--workers -1: must be >= 0 (0 = all cores)" in r.output, r.output
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_a_size_above_the_source_images_is_explained(small_source, tmp_path):
    """Images are never upscaled: --size 2000 on 48 px images says so and what to pass instead."""
    r = _pack("--source", small_source, "--out", tmp_path / "p", "--size", 2000, "--workers", 1)
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())  # the console wraps long lines
    assert "--size 2000 is larger than the shorter side of 30 of 30 source images (48 px at most)" in said
    assert "never upscaled" in said and "--size 48 or less" in said
    quiet = _pack("--source", small_source, "--out", tmp_path / "q", "--size", 48, "--workers", 1)
    assert quiet.exit_code == 0 and "never upscaled" not in quiet.stderr
