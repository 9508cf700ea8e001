"""`hamengine serve`: a FastAPI app that classifies and explains dermatoscopic images with one run.

Routes: GET / (the single page), GET /api/health, GET /api/model, POST /api/predict (multipart field
`image`, and for a --meta model optional fields `age`, `sex`, `site` -> JSON; a bad one -> 422 naming it), POST /api/explain (multipart field `image` -> Grad-CAM overlay PNG).

Limits, and why each is where it is:
- Upload size: a pure ASGI middleware rejects a Content-Length over the limit before any byte is read
  and counts the bytes actually received (chunked uploads carry no Content-Length) -> 413.
- Images are opened by the one rule of loaders/ingest/imaging.py (`open_image`), as `hamengine predict` and
  `pack` open them: the header is parsed first; width x height over `max_pixels` (default: the one
  limit, MAX_PIXELS) -> 413 before a single pixel is decoded.
- Not an image / unsupported format -> 415; truncated or corrupt image data, empty upload, missing
  field, text instead of a file -> 422; every error body is {"detail": "<what went wrong and what to do>"}.
- The model is loaded once per app; predictions go through a micro-batcher (serve_backend.py).
- Nothing is written to disk except multipart spool files, which the multipart parser keeps in memory
  up to 1 MiB and beyond that in the system temporary folder, deleted when the request ends.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from hamengine.config import CLASS_NAMES, MAX_PIXELS
from hamengine.engine.serve.backend import (
    Backend,
    InputError,
    MicroBatcher,
    PredictorBackend,
    class_table,
    load_test_metrics,
)
from hamengine.engine.serve.page import render_page
from hamengine.loaders.ingest.imaging import BadImage, ImageProblem, open_image

# Formats PIL may even try to parse: a short allow-list keeps exotic parsers away from uploads.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
MULTIPART_OVERHEAD = 64 * 1024  # boundary + part headers on top of the file itself
FIELD = "image"
# HTTP status per image problem; the rest (empty, corrupt, truncated) are 422.
IMAGE_STATUS = {ImageProblem.TOO_LARGE: 413, ImageProblem.NOT_AN_IMAGE: 415}


@dataclass(frozen=True)
class ServeLimits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = MAX_PIXELS  # width x height; the limit every command uses (loaders/ingest/imaging.py)
    max_batch: int = 8  # micro-batch size (1: no batching)
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    threads: int | None = None  # request worker threads (None: the server's default pool)


class UploadError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def decode_upload(data: bytes, limits: ServeLimits) -> Image.Image:
    """Bytes -> a fully decoded, size-checked PIL image (mode and EXIF kept: the backend's
    preprocessing applies orientation and converts to RGB, exactly as `hamengine predict` does),
    or UploadError(413/415/422) saying what is wrong."""
    if len(data) > limits.max_upload_bytes:
        raise UploadError(413, _too_large(len(data), limits))
    try:
        return open_image(data, name=f"the upload in field '{FIELD}'", max_pixels=limits.max_pixels,
                          formats=ACCEPTED_FORMATS)
    except BadImage as exc:
        raise UploadError(IMAGE_STATUS.get(exc.problem, 422), str(exc)) from None


def _too_large(n: int | None, limits: ServeLimits) -> str:
    mb = limits.max_upload_bytes / (1024 * 1024)
    got = f" ({n / (1024 * 1024):.1f} MiB)" if n is not None else ""
    return f"the upload is too large{got}: this server accepts images up to {mb:g} MiB"


class BodyLimitMiddleware:
    """Rejects request bodies over `limit` bytes with 413: by Content-Length up front, and by
    counting received chunks (a missing or lying Content-Length cannot get past it)."""

    def __init__(self, app: Any, limit: int, message: Callable[[int | None], str]):
        self.app = app
        self.limit = limit
        self.message = message

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0 or declared > self.limit:
                await _send_json(send, 413 if declared > self.limit else 400,
                                 self.message(declared) if declared > self.limit
                                 else "invalid Content-Length header")
                return
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPExceptions from body parsing, so this becomes the 413.
                    raise HTTPException(413, self.message(None))
            return message

        await self.app(scope, counting_receive, send)


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def form_fields(request: Request) -> tuple[str, ...]:
    """The names of the multipart form's fields, so that a missing `image` can say what came instead.
    The form is the one FastAPI already parsed (Starlette keeps it on the request)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return ()
    return tuple(dict.fromkeys((await request.form()).keys()))


def add_error_handlers(app: Any) -> None:
    """Every error a client causes answers with one JSON sentence: {"detail": "..."}."""

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 is a list of pydantic errors; a client deserves one sentence.
        errors = exc.errors()
        if any(tuple(e.get("loc", ()))[-1:] == (FIELD,) for e in errors):
            detail = (f"the form field '{FIELD}' holds text, not a file: send the image file as "
                      f"multipart/form-data field '{FIELD}' (curl -F {FIELD}=@lesion.jpg)")
        else:
            detail = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors)
        return JSONResponse({"detail": detail}, status_code=422)


def read_upload(request: Request, image: UploadFile | None, fields: tuple[str, ...], limits: ServeLimits
                ) -> Image.Image:
    """The uploaded image, decoded under the limits, or an UploadError saying what to send."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise UploadError(415, f"send the image as multipart/form-data in a field named '{FIELD}' "
                               f"(got Content-Type '{ctype or 'none'}')")
    if image is None or isinstance(image, str):
        got = f" (the form has {', '.join(repr(f) for f in fields)})" if fields else " (the form is empty)"
        raise UploadError(422, f"no file in a form field named '{FIELD}'{got}: send the image as "
                               f"multipart/form-data field '{FIELD}'")
    data = image.file.read(limits.max_upload_bytes + 1)  # bounded read, counted
    return decode_upload(data, limits)


def request_meta(age: str | None, sex: str | None, site: str | None, info: dict[str, Any],
                 backend: Backend) -> dict[str, Any] | None:
    """The request's optional metadata fields as a row (None when none is given); 422 naming the
    field for a bad value, or for any field sent to a model trained without --meta."""
    meta = {"age": age, "sex": sex, "localization": site}
    if all(v in (None, "") for v in meta.values()):
        return None
    if info.get("metadata") is None:
        raise UploadError(422, f"this model ({info['model']}, run {info['run']}) was trained without --meta: "
                               "it takes no age, sex or site fields; send the image alone")
    if getattr(backend, "encode_meta", None) is not None:
        try:
            backend.encode_meta(meta)
        except InputError as exc:
            raise UploadError(422, f"metadata: {exc}") from None
    return meta


def predict_response(probs: Any, classes: tuple[str, ...], info: dict[str, Any], image_size: tuple[int, int],
                     metadata_used: bool, t0: float) -> dict[str, Any]:
    """/api/predict's JSON: every class's probability, the top class, the model and the latency."""
    table = {dx: float(p) for dx, p in zip(classes, probs, strict=True)}
    top = max(table, key=table.__getitem__)
    return {"probabilities": table,
            "top": {"dx": top, "name": CLASS_NAMES.get(top, top), "probability": table[top]},
            "model": info["model"], "run": info["run"], "metadata_used": metadata_used,
            "image_size": list(image_size), "latency_ms": round((time.perf_counter() - t0) * 1000.0, 3)}


def create_app(run_dir: str | Path, device: str = "auto", max_upload_mb: float = 10.0, *,
               checkpoint: str | None = None, tta: str | None = None, limits: ServeLimits | None = None,
               backend: Backend | None = None) -> Any:
    """The FastAPI app for one run. The model loads here, once (not per request or per worker).
    checkpoint / tta None: the run's own (config.json checkpoint and test_tta).
    `limits` overrides `max_upload_mb`; `backend` replaces the run's Predictor (another model source)."""
    run_dir = Path(run_dir)
    if limits is None:
        limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    backend = backend if backend is not None else PredictorBackend(run_dir, device, checkpoint, tta)
    batcher = MicroBatcher(backend, max_batch=limits.max_batch, max_wait_ms=limits.max_wait_ms)
    info = {**backend.describe(), "classes": class_table(backend.classes),
            "max_upload_mb": limits.max_upload_bytes / (1024 * 1024), "max_pixels": limits.max_pixels,
            "max_batch": limits.max_batch}
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if limits.threads:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = limits.threads
        yield
        batcher.close()

    app = FastAPI(title="hamengine serve", lifespan=lifespan,
                  description="Research software for skin-lesion classification; not a diagnosis.")
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_upload_bytes + MULTIPART_OVERHEAD,
                       message=lambda n: _too_large(n, limits))
    app.state.batcher = batcher
    page = render_page(info)

    add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        alive = batcher.alive
        return {"status": "ok" if alive else "error", "model_loaded": alive, "model": info["model"],
                "uptime_s": round(time.time() - started, 3), "batches": batcher.batches,
                "images": batcher.images}

    @app.get("/api/model")
    def model() -> dict[str, Any]:
        return {**info, "test_metrics": load_test_metrics(run_dir)}

    # Sync handlers: FastAPI runs them in its thread pool, so decoding runs in parallel threads.
    @app.post("/api/predict")
    def predict_endpoint(request: Request, image: UploadFile | None = File(None, description="the image"),
                age: str | None = Form(None, description="patient age in years (a --meta model)"),
                sex: str | None = Form(None, description="male, female or unknown (a --meta model)"),
                site: str | None = Form(None, description="body site, HAM10000's localization (a --meta model)"),
                fields: tuple[str, ...] = Depends(form_fields)) -> dict[str, Any]:
        t0 = time.perf_counter()
        meta = request_meta(age, sex, site, info, backend)  # a bad field: 422 before the image is read
        upload = read_upload(request, image, fields, limits)
        try:
            probs = batcher.probabilities_of(upload, meta=meta)  # float[C]
        except InputError as exc:
            raise UploadError(422, f"the image cannot be used: {exc}") from None
        return predict_response(probs, backend.classes, info, upload.size, meta is not None, t0)

    @app.post("/api/explain")
    def explain(request: Request, image: UploadFile | None = File(None, description="the image"),
                dx: str | None = None, fields: tuple[str, ...] = Depends(form_fields)) -> Response:
        if dx is not None and dx not in backend.classes:
            raise UploadError(422, f"unknown class '{dx}': choose one of {', '.join(backend.classes)}")
        upload = read_upload(request, image, fields, limits)
        try:
            png, cls = batcher.explain(upload, dx)
        except InputError as exc:
            raise UploadError(422, f"the image cannot be used: {exc}") from None
        return Response(png, media_type="image/png",
                        headers={"X-Class": cls, "Cache-Control": "no-store"})

    return app
