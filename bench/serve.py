"""`hamengine bench serve RUN`: requests/s and latency percentiles of POST /api/predict against a real
`hamengine serve` process on a free loopback port, at each concurrency level, for a bounded number
of requests. The server runs in its own process so the load generator does not share its GIL; on a
small machine both still share the cores, so quote results with the hardware they ran on."""
from __future__ import annotations

import io
import shlex
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np

from hamengine.commands.common import console, emit_json, fail


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
                raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /api/health within {timeout:.0f} s")
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


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--requests", "n_requests", default=200, show_default=True, type=click.IntRange(1, 100_000),
              help="Requests sent at each concurrency level (after a short warm-up).")
@click.option("--concurrency", default="1,8", show_default=True,
              help="Comma-separated numbers of concurrent clients, one measurement each.")
@click.option("--image", "image_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image to send (default: a synthetic 600x450 JPEG, HAM10000's size).")
@click.option("--device", default="auto", show_default=True, help="Server inference device.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Server micro-batch size (1: no batching), passed to `hamengine serve`.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0),
              help="Requests sent before measuring (model warm-up, connection setup).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with hardware).")
def bench_serve(run: Path, n_requests: int, concurrency: str, image_path: Path | None, device: str,
                max_batch: int, warmup: int, as_json: bool) -> None:
    """Requests/s and client latency p50/p99 of POST /api/predict against `hamengine serve RUN`
    started on a free loopback port (never exposed), at each concurrency level."""
    try:
        import httpx
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ImportError as exc:
        fail(f"bench serve needs the 'serve' extra ({exc.name} is missing): pip install 'hamengine[serve]'")
    except ValueError:
        fail(f"--concurrency must be comma-separated integers like 1,8 (got {concurrency!r})")
    if not levels or min(levels) < 1:
        fail(f"--concurrency levels must be >= 1 (got {concurrency!r})")
    image = image_path.read_bytes() if image_path else synthetic_jpeg()
    from hamengine.engine.environment import hardware

    results = []
    try:
        with running_server(run, free_port(), device, ["--max-batch", str(max_batch)]) as url:
            info = httpx.get(f"{url}/api/model").json()
            if warmup:
                measure(url, image, warmup, 1)
            for c in levels:
                if not as_json:
                    console.print(f"concurrency {c}: {n_requests} requests ...")
                results.append(measure(url, image, n_requests, c))
    except RuntimeError as exc:
        fail(str(exc))
    report = {"run": str(run), "model": info.get("model"), "input_size": info.get("input_size"),
              "device": info.get("device"), "max_batch": max_batch, "image_bytes": len(image),
              "image": str(image_path) if image_path else "synthetic 600x450 JPEG",
              "results": results, "hardware": hardware(),
              "command": "hamengine bench serve " + shlex.join(sys.argv[3:] if len(sys.argv) > 3 else [])}
    if as_json:
        emit_json(report)
        return
    from rich.table import Table

    table = Table(title=f"bench serve: {report['model']} on {report['device']} (max batch {max_batch})")
    for col in ("concurrency", "req/s", "p50 ms", "p99 ms", "mean batch", "errors"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["concurrency"]), str(r["req_per_s"]), str(r["p50_ms"]), str(r["p99_ms"]),
                      str(r["mean_batch"]), str(r["errors"]))
    console.print(table)
