"""Shared by the serve tests (their run is conftest.py's `serve_run`): images to upload and a real
`hamengine serve` subprocess on a free loopback port."""
from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from hamengine.bench.serve import free_port, running_server

RUN_SIZE = 64  # model input side for the test run: small enough for CPU, big enough for Grad-CAM


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
