"""`hamengine serve RUN`: the web page and JSON API for one trained run (FastAPI + uvicorn)."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from hamengine.commands.common import CKPT_CHOICES, CKPT_HELP, TTA_CHOICES, TTA_HELP, err_console, fail
from hamengine.config import MAX_PIXELS
from hamengine.engine.runtime.run import RunDir
from hamengine.errors import UserError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default serves this machine only; 0.0.0.0 exposes the "
                   "research tool to the network (no authentication).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on.")
@click.option("--device", default="auto", show_default=True,
              help="Inference device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
@click.option("--checkpoint", type=click.Choice(CKPT_CHOICES), default=None, help=CKPT_HELP)
@click.option("--tta", type=click.Choice(TTA_CHOICES), default=None, help=TTA_HELP)
@click.option("--max-upload-mb", default=10.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Largest accepted upload in MiB; larger requests get HTTP 413.")
@click.option("--max-pixels", default=MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
              help="Largest accepted image (width x height), checked before decoding "
                   "(decompression-bomb guard; the default is the limit pack and predict use); "
                   "larger images get HTTP 413.")
@click.option("--workers-threads", "threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="Threads that read and decode uploads in parallel (0: the server default, 40). "
                   "The model itself runs in one batching thread.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Largest micro-batch: concurrent requests are predicted in one forward pass "
                   "(1 turns batching off).")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long the first request of a micro-batch waits for others to join it.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="uvicorn log level.")
def serve(run: Path, host: str, port: int, device: str, checkpoint: str | None, tta: str | None, max_upload_mb: float, max_pixels: int,
          threads: int, max_batch: int, max_wait_ms: float, log_level: str) -> None:
    """Serve a web page and JSON API that classify and explain dermatoscopic images with a
    checkpoint of RUN, the one it was trained to be judged by unless --checkpoint (research software, not a
    diagnosis).

    \b
    GET  /              upload page: probabilities of the 7 classes and a Grad-CAM overlay
    POST /api/predict   multipart field "image" -> {probabilities, top, model, latency_ms}
    POST /api/explain   multipart field "image" (optional ?dx=CLASS) -> overlay PNG
    GET  /api/health, GET /api/model (classes, input size, the run's test metrics)
    """
    try:
        import uvicorn

        from hamengine.engine.serve.server import (  # lazy: torch (--help stays fast)
            ServeLimits,
            create_app,
        )
    except ImportError as exc:
        fail(f"serving needs the 'serve' extra ({exc.name} is missing): pip install 'hamengine[serve]'")
    from hamengine.engine.evaluate.predict import (
        weights_of,  # lazy: torch (--help stays fast)
    )

    try:
        checkpoint = str(weights_of(run, checkpoint))
    except UserError as exc:  # config.json missing or unreadable: not a run directory
        fail(f"cannot serve {run}: {exc}", exc.exit_code)
    if not RunDir(run).checkpoint(checkpoint).is_file():
        fail(f"{run} has no checkpoints/{checkpoint}.pt: give a run directory written by `hamengine train`")
    if not is_loopback(host):
        err_console.print(f"[yellow]warning:[/] binding to {host}: anyone who can reach this address "
                          "can use the model (there is no authentication)")
    limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
                         max_batch=max_batch, max_wait_ms=max_wait_ms, threads=threads or None)
    try:
        app = create_app(run, device=device, checkpoint=checkpoint, tta=tta, limits=limits)
    except UserError as exc:  # RunError, a bad --device, an unloadable checkpoint: one clear line
        fail(f"cannot serve {run}: {exc}", exc.exit_code)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)
