"""Load a trained run once and predict single images: the code path of `hamengine predict`, `explain`
and `serve`.

Preprocessing equals the eval loader's: an image is opened and made RGB by the rule packing uses
(loaders/ingest/imaging.py: one pixel limit, EXIF orientation, 16-bit / palette / alpha handling), its
shorter side resized to the run's input size S, center cropped S x S, ImageNet-normalized. Probabilities are
softmax(log(p) / T + b) with T and the class bias b from RUN/calibration.json when present, else p.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from hamengine.config import (
    CLASS_NAMES,
    CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TTA,
    CheckpointName,
    StrEnum,
    TrainConfig,
)
from hamengine.engine.evaluate.calibration import Adjustment, load_adjustment
from hamengine.engine.runtime.checkpoint import CheckpointError, load_checkpoint, model_weights
from hamengine.engine.runtime.execution import resolve_execution
from hamengine.engine.runtime.run import RunDir, RunError
from hamengine.loaders.ingest.imaging import BadImage, open_rgb
from hamengine.loaders.ingest.metadata import MetadataError, MetaSchema
from hamengine.loaders.kinds.torch_loader import eval_transform
from hamengine.models import create_model
from hamengine.models.meta import MetaFusion
from hamengine.models.wrappers import unwrap
from hamengine.runtime import resolve_device


def tta_views(x: torch.Tensor, tta: TTA) -> list[torch.Tensor]:
    """Transformed copies of a batch x [N, 3, S, S]. Lesions have no canonical orientation, so every
    view is as valid as the original; averaging their probabilities reduces variance."""
    if tta == TTA.NONE:
        return [x]
    if tta == TTA.FLIPS:
        return [x, x.flip(3), x.flip(2), x.flip(2, 3)]
    rots = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return rots + [r.flip(3) for r in rots]


def predict_batch(model: nn.Module, x: torch.Tensor, tta: TTA = TTA.NONE,
                  meta: torch.Tensor | None = None) -> torch.Tensor:
    """Mean softmax over the TTA views (float32 [N, C], on x's device). Eval runs in float32: bf16
    logits are coarse enough to tie the top two classes, and the ISIC scorer counts a tie as wrong.
    meta [N, M]: the metadata of a --meta run's model (None: "all missing"; ignored otherwise)."""
    extra = (meta.float(),) if meta is not None and is_meta_model(model) else ()
    with torch.inference_mode():
        probs = None
        views = tta_views(x.float(), tta)
        for v in views:
            p = torch.softmax(model(v, *extra).float(), dim=1)
            probs = p if probs is None else probs + p
        return probs / len(views)


def is_meta_model(model: nn.Module) -> bool:

    return isinstance(unwrap(model), MetaFusion)


@dataclass
class LoadedRun:
    run: Path
    config: dict[str, Any]  # RUN/config.json (the resolved TrainConfig as a dict)
    model: nn.Module  # eval mode, on `device`
    model_name: str
    size: int
    classes: tuple[str, ...]
    checkpoint: Path
    epoch: int | None
    device: torch.device
    meta_schema: MetaSchema | None = None  # a --meta run: how age, sex and site are encoded for its model
    execution: Any = None  # engine.execution.Execution (inference: fp32, eager; the measured memory format)

    @property
    def memory_format(self) -> torch.memory_format:
        return self.execution.memory_format if self.execution is not None else torch.contiguous_format


def run_default(config: Mapping[str, Any], key: str, given: Any, kind: type[StrEnum]) -> Any:
    """`given`, or (None) what the run was trained to be judged with: config.json's `key` (`checkpoint`,
    `test_tta`), or the TrainConfig default for runs written before the key existed."""

    value = given if given is not None else config.get(key) or getattr(TrainConfig, key, None)
    try:
        return kind(value)
    except ValueError:
        raise RunError(f"config.json: {key} {value!r} is not one of {', '.join(k.value for k in kind)}") from None


def weights_of(run: str | Path, which: CheckpointName | str | None = None) -> CheckpointName:
    """`which`, or (None) the weights the run is judged by (config.json `checkpoint`; best by default)."""
    if which is not None:  # given: no need to read config.json (load_run passes it resolved)
        return CheckpointName(which)
    return run_default(RunDir(Path(run)).read_config(), "checkpoint", which, CheckpointName)


def checkpoint_path(run: Path, which: CheckpointName | str | None = None) -> Path:
    run_dir = RunDir(run)
    path = run_dir.checkpoint(weights_of(run, which).value)
    if not path.is_file():
        others = sorted(p.name for p in run_dir.checkpoints.glob("*.pt")) if run_dir.checkpoints.is_dir() else []
        hint = f"; available: {', '.join(others)} (use --checkpoint)" if others else \
            "; the run has no checkpoints yet (did training start?)"
        raise RunError(f"{path} does not exist{hint}")
    return path


def load_run(run: str | Path, checkpoint: CheckpointName | str | None = None,
             device: str | torch.device = "auto") -> LoadedRun:
    """Model of a run, in eval mode on `device`. Architecture and input size from RUN/config.json;
    checkpoint None: the weights the run is judged by (config.json `checkpoint`)."""

    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run}: no such run directory")
    run_dir = RunDir(run)
    config = run_dir.read_config()
    path = checkpoint_path(run, run_default(config, "checkpoint", checkpoint, CheckpointName))
    try:
        ckpt = load_checkpoint(path)  # weights_only=True; damage -> CheckpointError naming the file
        weights = model_weights(ckpt, path)
    except CheckpointError as e:
        raise RunError(f"{e}; or try --checkpoint {'last' if path.stem == 'best' else 'best'}") from None
    model_name = str(ckpt.get("model_name") or config.get("model") or "")
    if not model_name:
        raise RunError(f"{run_dir.config_path}: no 'model' key")
    classes = tuple(ckpt.get("classes") or config.get("classes") or CLASSES)
    size = int(config.get("size") or 224)
    device = resolve_device(device)
    schema = run_meta_schema(run_dir, config)
    try:
        model = create_model(model_name, num_classes=len(classes),
                             meta_missing=torch.from_numpy(schema.missing()) if schema else None)
        model.load_state_dict(weights)
    except (ValueError, RuntimeError) as e:
        raise RunError(f"{path}: weights do not fit model {model_name!r} ({str(e).splitlines()[0]})") from None
    ex = inference_execution(config, model_name, size, device)
    ex.place(model).eval()  # the memory format resolve_execution chose for this model, side and host
    epoch = ckpt.get("epoch")
    return LoadedRun(run, config, model, model_name, size, classes, path,
                     int(epoch) if isinstance(epoch, int) else None, device, schema, ex)


def inference_execution(config: Mapping[str, Any], model_name: str, size: int, device: torch.device) -> Any:
    """The run's model as eval/predict/explain/serve run it: resolve_execution's inference plan
    (fp32, eager; memory format measured for this model, side and batch, or the run's forced one)."""

    forced = config.get("channels_last")
    cfg = TrainConfig(model=model_name, size=size, batch_size=int(config.get("batch_size") or 32),
                      channels_last=forced if isinstance(forced, bool) else None)
    return resolve_execution(cfg, device, inference=True)


def run_meta_schema(run_dir: RunDir, config: dict[str, Any]) -> MetaSchema | None:
    """RUN/metadata.json of a --meta run (None for a run without metadata)."""
    if not config.get("meta"):
        return None
    path = run_dir.metadata
    try:
        return MetaSchema.from_record(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: the metadata encoding of this --meta run is missing or unreadable ({e}); "
                       "it is written when training starts: re-train, or copy it from the run's origin") from None


def eval_crop(im: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> uint8 [3, S, S]: the loaders' eval transform (shorter side to S, antialiased
    bilinear, center crop), so a file predicts as its packed copy evaluates."""

    img = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # 3 x H x W
    return eval_transform(img, size)


def normalize(crop: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 ImageNet-normalized."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0
    return (crop.float() - mean) / std


class Predictor:
    """A run loaded once; `predict` maps images to calibrated probabilities.

    Thread safety: not re-entrant (one model); serve wraps it in its own batcher lock.
    """

    def __init__(self, run: str | Path, checkpoint: CheckpointName | str | None = None,
                 device: str | torch.device = "auto", tta: TTA | str | None = None,
                 temperature: float | None = None, batch_size: int = 32):
        self.loaded = load_run(run, checkpoint, device)
        self.run = self.loaded.run
        self.model = self.loaded.model
        self.model_name = self.loaded.model_name
        self.classes = self.loaded.classes
        self.size = self.loaded.size
        self.device = self.loaded.device
        self.checkpoint_name = self.loaded.checkpoint.name
        self.tta = run_default(self.loaded.config, "test_tta", tta, TTA)  # None: the run's own
        self.batch_size = batch_size
        try:
            adj = load_adjustment(self.run, len(self.classes))  # temperature and class bias of the run
        except ValueError as e:
            raise RunError(str(e)) from None
        self.adjustment = adj if temperature is None else Adjustment(float(temperature), adj.class_bias)
        self.temperature = self.adjustment.temperature
        self.meta_schema = self.loaded.meta_schema  # None: an image-only run

    @property
    def uses_metadata(self) -> bool:
        return self.meta_schema is not None

    def encode_meta(self, rows: Sequence[Mapping[str, Any] | None]) -> torch.Tensor | None:
        """float32 [N, M] for a --meta run (a None or empty row: every field 'unknown'); None for an
        image-only run. Values are checked strictly: MetadataError names the field and the choices."""
        if self.meta_schema is None:
            if any(rows):
                raise MetadataError(f"{self.run} was trained without --meta: it takes no age, sex or site "
                                    "(leave them out, or use a run trained with --meta)")
            return None
        return torch.from_numpy(self.meta_schema.encode([r or {} for r in rows], strict=True))

    def preprocess(self, image: bytes | Image.Image | str | Path) -> tuple[Image.Image, torch.Tensor]:
        """-> (the S x S RGB crop the model sees, its normalized tensor [3, S, S])."""
        crop = eval_crop(open_rgb(image), self.size)  # uint8 3 x S x S; BadImage if unreadable
        return Image.fromarray(crop.permute(1, 2, 0).numpy()), normalize(crop)

    def calibrate(self, probs: torch.Tensor) -> np.ndarray:
        """softmax(log(p) / T + b) (engine/calibration.Adjustment.apply, which eval uses too),
        applied AFTER averaging the TTA views, the order `hamengine eval` fits T and b in."""
        return self.adjustment.apply(probs.double().cpu().numpy())

    def predict_tensor(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> np.ndarray:
        """x [N, 3, S, S] normalized (meta [N, M] for a --meta run, None = unknown) -> probabilities
        float64 [N, C] (TTA averaged, adjusted)."""
        m = meta.to(self.device) if meta is not None else None
        x = x.to(self.device).contiguous(memory_format=self.loaded.memory_format)
        return self.calibrate(predict_batch(self.model, x, self.tta, m))

    def probabilities(self, images: Sequence[bytes | Image.Image | str | Path],
                meta: Sequence[Mapping[str, Any] | None] | None = None) -> np.ndarray:
        """Images (decoded or not) -> float64 [N, C]; raises BadImage on the first unreadable one
        (use `predict_files` to keep going past bad files). meta: per image {age, sex, localization}."""
        if not images:
            return np.zeros((0, len(self.classes)))
        rows = list(meta) if meta is not None else [None] * len(images)
        enc = self.encode_meta(rows)  # checked before any image is decoded
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im)[1] for im in images[i:i + self.batch_size]])
            out.append(self.predict_tensor(x, enc[i:i + self.batch_size] if enc is not None else None))
        return np.concatenate(out)

    def predict_files(self, paths: Sequence[str | Path],
                      meta: Sequence[Mapping[str, Any] | None] | None = None) -> list[np.ndarray | BadImage]:
        """Per path: probabilities [C], or the BadImage that made it unreadable."""
        results: list[np.ndarray | BadImage] = [BadImage("not processed")] * len(paths)
        pending: list[tuple[int, torch.Tensor]] = []
        enc = self.encode_meta(list(meta) if meta is not None else [None] * len(paths))

        def flush() -> None:
            if pending:
                rows = enc[[j for j, _ in pending]] if enc is not None else None
                probs = self.predict_tensor(torch.stack([t for _, t in pending]), rows)
                for (j, _), p in zip(pending, probs, strict=True):
                    results[j] = p
                pending.clear()

        for i, path in enumerate(paths):
            try:
                pending.append((i, self.preprocess(path)[1]))
            except BadImage as e:
                results[i] = e
            if len(pending) >= self.batch_size:
                flush()
        flush()
        return results

    def top_k(self, probs: np.ndarray, k: int = 3) -> list[dict[str, Any]]:

        order = np.argsort(-probs, kind="stable")[: max(1, min(k, len(self.classes)))]
        return [{"dx": self.classes[c], "name": CLASS_NAMES.get(self.classes[c], self.classes[c]),
                 "probability": float(probs[c])} for c in order]
