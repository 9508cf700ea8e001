"""The model side of `hamengine serve`: one loaded run behind a micro-batcher.

Concurrency model (why): request threads (the server's thread pool) decode and check uploads in
parallel -- PIL releases the GIL while decoding -- and hand decoded RGB images to ONE batcher thread
that owns the model. The batcher takes the first waiting image, waits at most `max_wait_ms` for more
(up to `max_batch`), runs one forward pass for all of them and resolves each request's future. One
forward over N images costs much less than N forwards, and the model is never entered by two threads
at once. Grad-CAM (hooks + a backward pass on the same module) takes the same lock as the batcher, so
an explanation never interleaves with a batched forward.
"""
from __future__ import annotations

import io
import json
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from hamengine.config import CLASS_NAMES
from hamengine.engine.evaluate.predict import Predictor
from hamengine.engine.runtime.run import RunDir
from hamengine.engine.serve.gradcam import explain_image
from hamengine.errors import UserError
from hamengine.loaders.ingest.imaging import BadImage
from hamengine.loaders.ingest.metadata import MetadataError


class InputError(UserError, ValueError):
    """An upload the model cannot take (raised by Backend.prepare); becomes HTTP 422."""


class Backend(Protocol):
    """What the web app needs from a trained run."""

    classes: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        """model, run, input_size, temperature, device, checkpoint."""

    def prepare(self, image: Image.Image) -> Any:
        """A decoded upload -> the model input for it (runs in the request threads, in parallel)."""

    def batch_probabilities(self, prepared: list[Any]) -> np.ndarray:
        """Prepared inputs -> calibrated probabilities float[N, len(classes)] (rows sum to 1)."""

    def explain(self, image: Image.Image, dx: str | None) -> tuple[bytes, str]:
        """Grad-CAM overlay as PNG bytes for class `dx` (None: the predicted class), and that class."""


class PredictorBackend:
    """Adapter over hamengine.engine.evaluate.predict.Predictor (the same preprocessing, calibration and
    weights as `hamengine predict`) and hamengine.engine.serve.gradcam."""

    def __init__(self, run_dir: str | Path, device: str = "auto", checkpoint: str | None = None,
                 tta: str | None = None):

        self.run_dir = Path(run_dir)
        self.predictor = Predictor(self.run_dir, checkpoint=checkpoint, device=device, tta=tta)
        self.classes = tuple(self.predictor.classes)

    def describe(self) -> dict[str, Any]:
        p = self.predictor
        return {"model": p.model_name, "run": self.run_dir.resolve().name, "input_size": int(p.size),
                "temperature": float(p.temperature), "decision": p.adjustment.decision,
                "class_bias": None if p.adjustment.class_bias is None else list(p.adjustment.class_bias),
                "device": str(p.device),
                "checkpoint": p.checkpoint_name, "epoch": p.loaded.epoch, "tta": str(p.tta),
                # a --meta model: the optional fields and their choices (None: image only)
                "metadata": p.meta_schema.record() if p.meta_schema is not None else None}

    def encode_meta(self, meta: dict[str, Any]) -> Any:
        """float32 [M] for one request's {age, sex, localization}; InputError names a bad field."""

        try:
            enc = self.predictor.encode_meta([meta])
        except MetadataError as exc:
            raise InputError(str(exc)) from None
        return None if enc is None else enc[0]

    def prepare(self, image: Image.Image):

        try:
            return self.predictor.preprocess(image)[1]  # float [3, S, S], normalized (EXIF applied)
        except BadImage as exc:
            raise InputError(str(exc)) from None

    def batch_probabilities(self, prepared: list, metas: list | None = None) -> np.ndarray:
        import torch

        meta = None
        if metas is not None and self.predictor.meta_schema is not None:  # None rows: every field unknown
            missing = torch.from_numpy(self.predictor.meta_schema.missing())
            meta = torch.stack([m if m is not None else missing for m in metas])
        return self.predictor.predict_tensor(torch.stack(prepared), meta)  # float64 [N, C]

    def explain(self, image: Image.Image, dx: str | None) -> tuple[bytes, str]:

        target = self.classes.index(dx) if dx is not None else None
        try:
            overlay, cls_index = explain_image(self.predictor, image, target)
        except BadImage as exc:
            raise InputError(str(exc)) from None
        buf = io.BytesIO()
        overlay.save(buf, format="PNG")
        return buf.getvalue(), self.classes[cls_index]


def load_test_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN/eval-test/metrics.json when present (None otherwise or when unreadable)."""
    path = RunDir(run_dir).eval_metrics_path("test")
    try:
        return _finite(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _finite(obj: Any) -> Any:
    """NaN / Infinity (Python's json writes them, e.g. an AUC undefined for an absent class) -> None:
    strict JSON responses cannot carry them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def class_table(classes: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"dx": c, "name": CLASS_NAMES.get(c, c)} for c in classes]


@dataclass
class _Job:
    prepared: Any  # Backend.prepare's output for one image
    meta: Any = None  # Backend.encode_meta's output (a --meta model given metadata), else None
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Collects single-image predictions from many threads into batched forward passes."""

    def __init__(self, backend: Backend, max_batch: int = 8, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.model_lock = threading.Lock()  # held for every use of the model (forward or Grad-CAM)
        self.batches = 0  # forward passes run (for /api/health)
        self.images = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="hamengine-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def probabilities_of(self, image: Image.Image, timeout: float | None = 120.0,
                meta: dict[str, Any] | None = None) -> np.ndarray:
        """Probabilities float[C] for one image (meta: its {age, sex, localization}, checked here);
        blocks the calling (request) thread only."""
        if not self.alive:
            raise RuntimeError("the model worker has stopped")
        encoded = self.backend.encode_meta(meta) if meta else None  # InputError before any queueing
        job = _Job(self.backend.prepare(image), encoded)  # preprocessing here, in parallel request threads
        self._queue.put(job)
        return job.future.result(timeout=timeout)

    def explain(self, image: Image.Image, dx: str | None) -> tuple[bytes, str]:
        with self.model_lock:
            return self.backend.explain(image, dx)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            try:
                with self.model_lock:
                    metas = [j.meta for j in jobs]
                    probs = (self.backend.batch_probabilities([j.prepared for j in jobs], metas)  # [N, C]
                             if any(m is not None for m in metas) else
                             self.backend.batch_probabilities([j.prepared for j in jobs]))
                self.batches += 1
                self.images += len(jobs)
                for job, row in zip(jobs, probs, strict=True):
                    job.future.set_result(row)
            except BaseException as exc:  # noqa: BLE001 - every waiting request must be answered
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            if stop:
                return
