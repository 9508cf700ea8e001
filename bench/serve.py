"""`hamengine bench serve RUN`: requests/s and latency percentiles of POST /api/predict against a real
`hamengine serve` process on a free loopback port, at each concurrency level, for a bounded number
of requests. The server runs in its own process so the load generator does not share its GIL; on a
small machine both still share the cores, so quote results with the hardware they ran on."""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hamengine.bench import BenchError
from hamengine.engine.runtime.environment import hardware
from hamengine.errors import ConfigError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_jpeg(width: int = 600, height: int = 450, seed: int = 0) -> bytes:
    """A dermoscopy-sized JPEG (skin tone, a dark blob, noise) so decode cost is realistic."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = ((xx - width / 2) ** 2 / (width / 4) ** 2 + (yy - height / 2) ** 2 / (height / 4) ** 2) < 1
    img = np.empty((height, width, 3), np.float32)
    img[:] = (214, 160, 140)
    img[blob] = (110, 70, 55)
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@contextmanager
def running_server(run: Path, port: int, device: str, extra: list[str], timeout: float = 180.0):
    """`hamengine serve` in a subprocess on 127.0.0.1:port; yields the base URL once healthy."""
    import httpx

    cmd = [sys.executable, "-m", "hamengine", "serve", str(run), "--host", "127.0.0.1", "--port",
           str(port), "--device", device, "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise BenchError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the server did not answer /api/health within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(url: str, image: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    """Send `requests` predictions from `concurrency` client threads; latencies seen by the client."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    r = client.post("/api/predict", files={"image": ("bench.jpg", image, "image/jpeg")})
                    ok = r.status_code == 200
                    why = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, why = False, repr(exc)
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors.append(why)

    before = httpx.get(f"{url}/api/health").json()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/api/health").json()
    lat = np.asarray(latencies) * 1000.0
    batches = after["batches"] - before["batches"]
    return {
        "concurrency": concurrency, "requests": requests, "ok": len(latencies), "errors": len(errors),
        "first_error": errors[0] if errors else None, "wall_s": round(wall, 3),
        "req_per_s": round(len(latencies) / wall, 2) if wall > 0 else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "mean_ms": round(float(lat.mean()), 2) if lat.size else None,
        "mean_batch": round((after["images"] - before["images"]) / batches, 2) if batches else None,
    }


def run_bench_serve(run: Path, image: bytes, levels: list[int], n_requests: int = 200, device: str = "auto",
                    max_batch: int = 8, warmup: int = 5,
                    log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Start `hamengine serve RUN` on a free loopback port and measure each concurrency level."""

    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency levels must be >= 1 (got {','.join(map(str, levels)) or 'none'})")
    try:
        import httpx
    except ImportError as exc:
        raise BenchError(f"bench serve needs the 'serve' extra ({exc.name} is missing): "
                         f"pip install 'hamengine[serve]'") from None
    results = []
    with running_server(run, free_port(), device, ["--max-batch", str(max_batch)]) as url:
        info = httpx.get(f"{url}/api/model").json()
        if warmup:
            measure(url, image, warmup, 1)
        for c in levels:
            log(f"concurrency {c}: {n_requests} requests ...")
            results.append(measure(url, image, n_requests, c))
    return {"run": str(run), "model": info.get("model"), "input_size": info.get("input_size"),
            "device": info.get("device"), "max_batch": max_batch, "image_bytes": len(image),
            "results": results, "hardware": hardware()}
