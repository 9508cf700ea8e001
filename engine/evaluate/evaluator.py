"""`hamengine eval`: predictions of a run's checkpoint over a pack split, metrics, ISIC files, plots.

Outputs in RUN/eval-<split>/ (each file written atomically):
  metrics.json            classification_metrics + calibration + what was evaluated (checkpoint, TTA, ...)
  predictions.csv         image_id, lesion_id, true, pred, one probability column per class
  isic2018_submission.csv image,MEL,NV,BCC,AKIEC,BKL,DF,VASC (ISIC 2018 Task 3 format and column order)
  isic2018_ground_truth.csv the same rows one-hot: run the official scorer on the pair
  confusion_matrix.png, roc.png, reliability.png, confidence_hist.png, mistakes.png, correct.png
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hamengine.config import (
    ISIC_COLUMNS,
    TTA,
    CheckpointName,
    LoaderConfig,
    LoaderKind,
    MemoryFormat,
    Precision,
)
from hamengine.engine.evaluate import calibration, metrics
from hamengine.engine.evaluate import plots_eval as pe
from hamengine.engine.evaluate.predict import LoadedRun, load_run, predict_batch, run_default
from hamengine.engine.runtime.run import CALIBRATION_FILE, RunDir, RunError, check_split
from hamengine.fileio import atomic_write_bytes
from hamengine.loaders import build_loader
from hamengine.loaders.pack.records import Pack, PackError

SUBMISSION = "isic2018_submission.csv"
GROUND_TRUTH = "isic2018_ground_truth.csv"


@dataclass
class EvalOptions:
    split: str = "test"
    checkpoint: CheckpointName | None = None  # None: the run's own (config.json checkpoint; best by default)
    tta: TTA | None = None  # None: the run's own (config.json test_tta; none by default)
    calibrate: bool = False  # fit a temperature on val, save RUN/calibration.json
    fit_bias: bool = False  # fit per-class decision biases on val (balanced accuracy), save them there too
    n_boot: int = 1000  # lesion bootstrap replicates for the 95% intervals (0 = none)
    pack: str | None = None  # pack folder; default: the run's config.json "pack"
    unchecked_pack: bool = False  # evaluate on another pack even when it cannot be checked for leaks
    loader: LoaderKind = LoaderKind.AUTO
    batch_size: int = 64
    workers: int = 0
    device: str = "auto"
    plots: bool = True
    seed: int = 0
    meta: bool = True  # a --meta run: feed its metadata (False: every field "missing", in eval-<split>-no-meta/)


@dataclass
class SplitPredictions:
    split: str
    image_ids: list[str]
    lesion_ids: list[str]
    y: np.ndarray  # int64 [N]
    probs: np.ndarray  # float64 [N, C], TTA-averaged, before calibration
    classes: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_pack(run: LoadedRun, override: str | None):

    ref = override or run.config.get("pack")
    if not ref:
        raise RunError(f"{run.run / 'config.json'} names no pack: pass --pack PACK")
    candidates = [Path(ref)] if Path(ref).is_absolute() or override else [Path(ref), run.run / ref]
    for p in candidates:
        if (p / "manifest.json").is_file():
            try:
                return Pack(p)
            except PackError as e:
                raise RunError(str(e)) from None
    raise RunError(f"pack {ref!r} of this run was not found (tried {', '.join(map(str, candidates))}): "
                   f"pass --pack PACK")


def check_no_training_images(run: LoadedRun, pack, split: str, unchecked: bool) -> str:
    """The pack to score must not hold the run's training images. The run's own pack (same
    fingerprint, recorded in env.json at training) has lesion-disjoint splits by construction.
    Another pack is checked image id by image id against the training pack's train split when that
    pack is still there unchanged; otherwise refused unless `unchecked`. Returns how it was checked."""

    trained = (RunDir(run.run).read_env() or {}).get("pack_fingerprint")
    if trained is None:
        return "unknown (the run records no pack fingerprint)"
    if pack.fingerprint == trained:
        return "the run's own pack"
    train_ref = run.config.get("pack")
    try:
        train_pack = Pack(train_ref) if train_ref else None
    except PackError:
        train_pack = None
    if train_pack is not None and train_pack.fingerprint == trained:
        seen = set(train_pack.keys("train"))
        leaked = [k for k in pack.keys(split) if k in seen]
        if leaked:
            raise RunError(f"{pack.path}: {len(leaked)} of its {pack.num_samples(split)} {split} images were "
                           f"in this run's training split (e.g. {', '.join(leaked[:3])}): their scores would "
                           f"be inflated. Evaluate on a pack without them, or on the run's own pack {train_ref}")
        return f"another pack; no image of its {split} split was trained on"
    if unchecked:
        return "another pack, NOT checked for training images (--unchecked-pack)"
    raise RunError(f"{pack.path} is not the pack this run was trained on (fingerprint {pack.fingerprint[:12]} vs "
                   f"{trained[:12]}), and the training pack {train_ref} is gone or was rebuilt, so its {split} "
                   f"split cannot be checked for training images. Pass --unchecked-pack to evaluate anyway")


def eval_loader(pack, split: str, size: int, opts: EvalOptions, device: torch.device, meta_schema=None,
                memory_format: torch.memory_format = torch.contiguous_format):
    """The split's eval loader: (images [B, 3, S, S], labels [B]) in storage order, unaugmented; with a
    --meta run's schema also metadata [B, M] encoded as the run was trained (whatever pack it is)."""

    # fp32 batches: evaluation precision matters more than its speed (see predict_batch).
    fmt = MemoryFormat.CHANNELS_LAST if memory_format == torch.channels_last else MemoryFormat.CONTIGUOUS
    cfg = LoaderConfig(kind=opts.loader, size=size, batch_size=opts.batch_size, dtype=Precision.FP32,
                       workers=opts.workers, seed=opts.seed, meta=meta_schema is not None, meta_schema=meta_schema,
                       memory_format=fmt)  # the format the run's model was placed in (load_run)
    return build_loader(pack, split, cfg, device)


def collect(run: LoadedRun, pack, split: str, opts: EvalOptions, progress: bool = True) -> SplitPredictions:
    """Probabilities of every sample of `split` (storage order), checked against the pack's labels."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if pack.num_samples(split) == 0:
        raise RunError(f"{pack.path}: split {split!r} has no samples")
    if tuple(pack.classes) != tuple(run.classes):
        raise RunError(f"{pack.path}: pack classes {pack.classes} differ from the run's {run.classes}")
    loader = eval_loader(pack, split, run.size, opts, run.device, run.meta_schema if opts.meta else None,
                         run.memory_format)
    probs, labels = [], []
    try:
        with Progress(TextColumn(f"eval {split}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not progress, transient=True) as bar:
            task = bar.add_task("eval", total=len(loader))
            for x, y, *meta in loader:
                probs.append(predict_batch(run.model, x.to(run.device), opts.tta, *meta).double().cpu())
                labels.append(y.cpu())
                bar.advance(task)
    finally:
        loader.close()  # worker processes / DALI pipelines end here, not at interpreter exit
    p = torch.cat(probs).numpy()
    y = torch.cat(labels).numpy().astype(np.int64)
    expected = pack.labels(split)
    if len(y) != len(expected) or not np.array_equal(y, expected):
        raise RunError(f"the {split} loader returned {len(y)} samples in an order that does not match the "
                       f"pack's {len(expected)} labels: cannot attribute predictions to image ids")
    meta = pack.metadata(split)
    keys = pack.keys(split)
    lesions = [str(m.get("lesion_id") or k) for m, k in zip(meta, keys, strict=True)]
    return SplitPredictions(split, keys, lesions, y, p, tuple(run.classes))


# ---------------------------------------------------------------- files

def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def _p(v: float) -> str:
    return repr(float(v))  # shortest string that reads back to the same float: no rounding ties


def isic_columns(classes: tuple[str, ...]) -> list[int]:
    """Index into `classes` of each ISIC 2018 column (MEL, NV, BCC, AKIEC, BKL, DF, VASC)."""
    try:
        return [classes.index(c.lower()) for c in ISIC_COLUMNS]
    except ValueError:
        raise RunError(f"classes {classes} are not the 7 HAM10000 classes: no ISIC 2018 submission") from None


def write_predictions(out: Path, sp: SplitPredictions, probs: np.ndarray) -> dict[str, Path]:
    pred = probs.argmax(axis=1)
    c = sp.classes
    rows = [[iid, lid, c[t], c[q], *map(_p, pr)] for iid, lid, t, q, pr in
            zip(sp.image_ids, sp.lesion_ids, sp.y, pred, probs, strict=True)]
    paths = {"predictions": atomic_write_bytes(out / "predictions.csv", _csv_bytes(
        ["image_id", "lesion_id", "true", "pred", *c], rows))}
    try:
        cols = isic_columns(c)
    except RunError:
        return paths
    header = ["image", *ISIC_COLUMNS]
    sub = [[iid, *(_p(pr[j]) for j in cols)] for iid, pr in zip(sp.image_ids, probs, strict=True)]
    gt = [[iid, *("1.0" if t == j else "0.0" for j in cols)] for iid, t in zip(sp.image_ids, sp.y, strict=True)]
    paths["submission"] = atomic_write_bytes(out / SUBMISSION, _csv_bytes(header, sub))
    paths["ground_truth"] = atomic_write_bytes(out / GROUND_TRUTH, _csv_bytes(header, gt))
    return paths


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


# ---------------------------------------------------------------- plots

def make_plots(out: Path, sp: SplitPredictions, probs: np.ndarray, m: dict[str, Any], pack=None
               ) -> dict[str, Path]:
    from PIL import Image


    c = sp.classes
    paths = {"confusion_matrix": out / "confusion_matrix.png", "roc": out / "roc.png",
             "reliability": out / "reliability.png", "confidence_hist": out / "confidence_hist.png"}
    pe.plot_confusion(m["confusion_matrix"], c, paths["confusion_matrix"],
                      title=f"{sp.split}: balanced accuracy {m['balanced_accuracy']:.3f}")
    pe.plot_roc(sp.y, probs, c, {dx: v["auc"] for dx, v in m["per_class"].items()}, paths["roc"])
    pe.plot_reliability(m["reliability"], m["ece"], paths["reliability"],
                        (m.get("calibration") or {}).get("ece_before"))
    pe.plot_confidence_hist(probs, sp.y, paths["confidence_hist"])
    if pack is not None:
        index = {k: i for i, k in enumerate(pack.keys(sp.split))}

        def load(row: int) -> Image.Image:
            return Image.open(io.BytesIO(pack.jpeg(sp.split, index[sp.image_ids[row]]))).convert("RGB")

        paths["mistakes"] = out / "mistakes.png"
        paths["correct"] = out / "correct.png"
        pe.plot_gallery(pe.confident_mistakes(probs, sp.y), load, probs, sp.y, c, sp.image_ids,
                        paths["mistakes"], "Most confident mistakes")
        pe.plot_gallery(pe.correct_per_class(probs, sp.y), load, probs, sp.y, c, sp.image_ids,
                        paths["correct"], "Correct predictions per class (most confident)")
    return paths


# ---------------------------------------------------------------- the whole evaluation

def score(sp: SplitPredictions, adjustment: calibration.Adjustment | float, n_boot: int, seed: int = 0
          ) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of the adjusted (temperature, class bias) probabilities; reliability bins added."""
    if not isinstance(adjustment, calibration.Adjustment):  # a bare temperature (older callers)
        adjustment = calibration.Adjustment(float(adjustment))
    probs = adjustment.apply(sp.probs)
    m = metrics.classification_metrics(sp.y, probs, sp.classes, lesion_ids=sp.lesion_ids, n_boot=n_boot,
                                       seed=seed)
    m["reliability"] = metrics.reliability_bins(probs, sp.y)
    return m, probs


def fit_calibration(run: LoadedRun, pack, opts: EvalOptions, val: SplitPredictions) -> dict[str, Any]:
    logits = calibration.log_probs(val.probs)
    t = calibration.fit_temperature(logits, val.y)
    info = {"fitted_on": "val", "n": len(val.y), "checkpoint": run.checkpoint.name, "tta": str(opts.tta),
            "val_nll_before": calibration.nll_at(logits, val.y, 1.0),
            "val_nll_after": calibration.nll_at(logits, val.y, t)}
    calibration.save_calibration(run.run, t, info)
    return {"temperature": t, **info}


def fit_bias_on(run: LoadedRun, opts: EvalOptions, val: SplitPredictions) -> dict[str, Any]:
    """Per-class decision biases on val log-probabilities (after the stored temperature), saved in
    RUN/calibration.json; every later eval, predict and serve applies them."""
    t = calibration.load_adjustment(run.run).temperature
    logits = calibration.log_probs(val.probs) / t
    bias = calibration.fit_class_bias(logits, val.y)
    info = {"fitted_on": "val", "n": len(val.y), "checkpoint": run.checkpoint.name, "tta": str(opts.tta),
            "objective": "val balanced accuracy",
            "val_balanced_accuracy_before": float(metrics.balanced_accuracy(val.y, logits.argmax(1), logits.shape[1])),
            "val_balanced_accuracy_after": float(metrics.balanced_accuracy(val.y, (logits + bias).argmax(1), logits.shape[1]))}
    calibration.save_class_bias(run.run, bias, info)
    return {"class_bias": dict(zip(val.classes, map(float, bias), strict=True)), **info}


def fit_decision(run_dir: str | Path, opts: EvalOptions, progress: bool = False) -> dict[str, Any]:
    """Fit (or refit) the run's per-class decision biases on val predictions of opts.checkpoint with
    opts.tta and store them in RUN/calibration.json (the temperature there is kept). The end of
    training calls this when cfg.decision is val-bias; `hamengine eval --fit-bias` does it too."""
    run = load_run(run_dir, opts.checkpoint, opts.device)
    opts = replace(opts, tta=run_default(run.config, "test_tta", opts.tta, TTA))
    pack = resolve_pack(run, opts.pack)
    return fit_bias_on(run, opts, collect(run, pack, "val", opts, progress))


def metadata_use(run: LoadedRun, opts: EvalOptions) -> str:
    """What the report says about metadata: used, withheld from a --meta model, or not a --meta run."""
    if run.meta_schema is None:
        return "not used (image only)"
    if not opts.meta:
        return "withheld: a --meta model given no metadata (every field 'unknown')"
    return "used: age, sex and body site fused with the image features (never dx_type)"


def evaluate_run(run_dir: str | Path, opts: EvalOptions, progress: bool = True) -> dict[str, Any]:
    """Evaluate one run; returns metrics.json's content (plus `outputs`: the written paths).
    `hamengine eval` and the end of training both come here: one schema, one precision (fp32)."""
    check_split(opts.split)
    run = load_run(run_dir, opts.checkpoint, opts.device)
    opts = replace(opts, tta=run_default(run.config, "test_tta", opts.tta, TTA))
    pack = resolve_pack(run, opts.pack)
    provenance = check_no_training_images(run, pack, opts.split, opts.unchecked_pack)
    sp = collect(run, pack, opts.split, opts, progress)
    cal: dict[str, Any] | None = None
    bias_fit: dict[str, Any] | None = None
    if opts.calibrate or opts.fit_bias:
        val = sp if opts.split == "val" else collect(run, pack, "val", opts, progress)
        if opts.calibrate:
            cal = fit_calibration(run, pack, opts, val)
        if opts.fit_bias:  # after the temperature: the bias is fitted on calibrated log-probabilities
            bias_fit = fit_bias_on(run, opts, val)
    try:
        adj = calibration.load_adjustment(run.run, len(run.classes))
    except ValueError as e:
        raise RunError(str(e)) from None
    temperature = adj.temperature
    if cal is None and temperature != 1.0:
        cal = {"temperature": temperature, "source": CALIBRATION_FILE}
    m, probs = score(sp, adj, opts.n_boot, opts.seed)
    if bias_fit is not None:
        m["decision_fit"] = bias_fit
    if cal is not None:
        raw = metrics.classification_metrics(sp.y, sp.probs, sp.classes)
        cal.update(ece_before=raw["ece"], ece_after=m["ece"], nll_before=raw["nll"], nll_after=m["nll"],
                   brier_before=raw["brier"], brier_after=m["brier"])
        m["calibration"] = cal
    m["eval"] = {"run": run.run.name, "model": run.model_name, "split": opts.split,
                 "checkpoint": run.checkpoint.name, "epoch": run.epoch, "tta": str(opts.tta),
                 "temperature": temperature, "decision": adj.decision,
                 "class_bias": None if adj.class_bias is None else dict(zip(run.classes, adj.class_bias,
                                                                            strict=True)),
                 "input_size": run.size, "pack": str(pack.path),
                 "pack_fingerprint": pack.fingerprint, "pack_check": provenance, "device": str(run.device),
                 "metadata": metadata_use(run, opts)}
    out = RunDir(run.run).eval_dir(opts.split)
    if run.meta_schema is not None and not opts.meta:
        out = out.with_name(out.name + "-no-meta")  # beside the with-metadata scores, not over them
    paths = write_predictions(out, sp, probs)
    if opts.plots:
        paths.update(make_plots(out, sp, probs, m, pack))
    m["files"] = {k: v.name for k, v in paths.items()} | {"metrics": "metrics.json"}
    paths["metrics"] = write_json(out / "metrics.json", m)
    m["outputs"] = {k: str(v) for k, v in paths.items()}
    return m
