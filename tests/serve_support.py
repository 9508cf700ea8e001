"""Shared by the serve tests: one small real run (synth -> pack -> train 1 epoch), images to upload,
and a real `hamengine serve` subprocess on a free loopback port."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from hamengine.bench.serve import free_port, running_server

RUN_SIZE = 64  # model input side for the test run: small enough for CPU, big enough for Grad-CAM


def _hamengine(*args: str, timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, "-m", "hamengine", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert out.returncode == 0, f"hamengine {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def build_run(base: Path) -> Path:
    """A real trained run under `base` (built once per pytest session; reused when complete)."""
    run = base / "serve-run"
    if (run / "checkpoints" / "best.pt").is_file():
        return run
    data, pack = base / "serve-synth", base / "serve-pack"
    _hamengine("synth", "--out", str(data), "--n", "150", "--size", "200x150", "--seed", "3")
    _hamengine("pack", "--source", str(data), "--out", str(pack), "--size", str(RUN_SIZE + 8))
    _hamengine("train", "--pack", str(pack), "--model", "hamnet", "--epochs", "1", "--size", str(RUN_SIZE),
               "--batch-size", "32", "--device", "cpu", "--out", str(run))
    return run


def real_or_synthetic_jpeg(fullres: Path | None) -> tuple[bytes, str]:
    """A real HAM10000 JPEG when the fixture is present, else a synthetic dermoscopy-like one."""
    if fullres is not None:
        jpgs = sorted(fullres.glob("HAM10000_images_part_*/*.jpg"))
        if jpgs:
            return jpgs[0].read_bytes(), jpgs[0].name
    from hamengine.bench.serve import synthetic_jpeg

    return synthetic_jpeg(), "synthetic.jpg"


def to_png(jpeg: bytes, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny file that decodes to width x height pixels (a decompression bomb's shape)."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@contextmanager
def serve_subprocess(run: Path, *extra: str, timeout: float = 120):
    """`hamengine serve RUN` on 127.0.0.1:<free port>; yields the base URL once /api/health answers."""
    with running_server(run, free_port(), "cpu", list(extra), timeout=timeout) as url:
        yield url
