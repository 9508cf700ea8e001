"""A synthetic HAM10000: same folder layout, metadata shape and class balance, drawn images.

`synth_metadata(n, seed)` builds the metadata table alone (fast, no images), so its statistics can be
checked at full size; `synthesize(out, ...)` draws the images with all cores and writes the Kaggle
layout. The metadata CSV is written last (temp file + os.replace), so a folder without it is never
mistaken for a complete dataset; a hidden marker file written first lets an interrupted run resume.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hamengine.config import CLASSES
from hamengine.errors import UserError
from hamengine.fileio import atomic_write_bytes
from hamengine.loaders.ingest.synth_draw import REALISMS, draw_image

SYNTH_VERSION = 1  # bump whenever the drawing or the metadata changes: old outputs then differ
METADATA_NAME = "HAM10000_metadata.csv"
PART_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
MASK_DIR = "HAM10000_masks"
MARKER_NAME = ".hamengine-synth.json"
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
FIRST_IMAGE_NUMBER = 24306  # ISIC_0024306 is HAM10000's first image id

# --- HAM10000 statistics (Tschandl et al. 2018) -------------------------------------------------
REAL_IMAGES = 10015
REAL_PART_1 = 5000  # images in HAM10000_images_part_1 of the Kaggle download
# Order of the classes in the real metadata file (it is grouped by dx in this order).
FILE_ORDER = ("bkl", "nv", "df", "mel", "vasc", "bcc", "akiec")
REAL_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
REAL_LESIONS = {"nv": 5403, "mel": 614, "bkl": 727, "bcc": 327, "akiec": 228, "vasc": 98, "df": 73}
# Images per dx_type and class; the column sums are HAM10000's: histo 5340, follow_up 3704,
# consensus 902, confocal 69 (follow-up only for nevi, confocal only for keratoses).
DX_TYPES = ("histo", "follow_up", "consensus", "confocal")
DX_TYPE_COUNTS = {
    "nv": (2484, 3704, 517, 0), "mel": (1113, 0, 0, 0), "bkl": (785, 0, 245, 69),
    "bcc": (514, 0, 0, 0), "akiec": (327, 0, 0, 0), "vasc": (63, 0, 79, 0), "df": (54, 0, 61, 0),
}
SEXES = ("male", "female", "unknown")
SEX_WEIGHTS = {
    "nv": (0.505, 0.488, 0.007), "mel": (0.607, 0.391, 0.002), "bkl": (0.560, 0.430, 0.010),
    "bcc": (0.592, 0.406, 0.002), "akiec": (0.760, 0.238, 0.002), "vasc": (0.380, 0.618, 0.002),
    "df": (0.630, 0.368, 0.002),
}
# Mean and spread of age per class; ages are multiples of 5 in [0, 85]; 57 of 10,015 are missing.
AGE_MEAN_STD = {"nv": (47, 14.5), "mel": (59.5, 16), "bkl": (64, 14), "bcc": (66, 12),
                "akiec": (68, 11.5), "vasc": (43, 22), "df": (54, 12.5)}
MISSING_AGE = 57 / 10015
LOCALIZATIONS = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
                 "lower extremity", "neck", "scalp", "trunk", "unknown", "upper extremity")
# Relative frequency of each localization (LOCALIZATIONS order) per class.
LOC_WEIGHTS = {
    "akiec": (0, 0, 12, 6, 2, 28, 0, 0, 4, 25, 2, 4, 0, 0, 17),
    "bcc": (7, 0, 66, 18, 0, 31, 0, 0, 2, 16, 4, 3, 0, 2, 6),
    "bkl": (8, 0, 60, 29, 4, 97, 0, 2, 1, 46, 10, 13, 22, 6, 32),
    "df": (4, 0, 0, 0, 0, 0, 0, 0, 0, 22, 0, 0, 0, 0, 10),
    "mel": (25, 0, 98, 11, 5, 28, 13, 0, 0, 52, 14, 1, 16, 4, 68),
    "nv": (253, 3, 456, 67, 11, 26, 81, 8, 15, 431, 27, 12, 393, 61, 168),
    "vasc": (12, 0, 9, 3, 0, 4, 0, 0, 0, 6, 1, 1, 6, 0, 1),
}


class SynthError(UserError):
    """The output folder or the options cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class SynthParams:
    """What determines a synthetic dataset's bytes (recorded in the marker file)."""

    n: int
    seed: int
    size: tuple[int, int]
    masks: bool
    version: int = SYNTH_VERSION
    realism: str = "light"  # synth_draw.REALISMS

    def to_json(self) -> dict:
        d = {"generator": "hamengine synth", **asdict(self), "size": list(self.size)}
        if self.realism == "light":  # markers written before --realism existed stay valid for resume
            d.pop("realism")
        return d


def class_counts(n: int) -> dict[str, int]:
    """HAM10000's class proportions scaled to n (largest remainder); every class gets at least
    min(3, n // 7) images, so lesion-grouped splits of small datasets still see every class."""
    if n < len(CLASSES):
        raise SynthError(f"--n {n} is too small: every one of the {len(CLASSES)} classes needs an image")
    quota = {dx: REAL_COUNTS[dx] * n / REAL_IMAGES for dx in CLASSES}
    counts = {dx: math.floor(q) for dx, q in quota.items()}
    by_remainder = sorted(CLASSES, key=lambda dx: (-(quota[dx] - counts[dx]), dx))
    for dx in by_remainder[: n - sum(counts.values())]:
        counts[dx] += 1
    floor = min(3, n // len(CLASSES))
    for dx in CLASSES:  # take what small classes lack from the largest class
        lack = floor - counts[dx]
        if lack > 0:
            counts[dx] += lack
            counts[max(counts, key=lambda c: counts[c])] -= lack
    return counts


def _images_per_lesion(rng: np.random.Generator, images: int, lesions: int) -> np.ndarray:
    """int [lesions] >= 1, summing to `images`: most lesions have one photo, some several."""
    extra = np.bincount(rng.integers(0, lesions, images - lesions), minlength=lesions)
    return 1 + extra


def synth_metadata(n: int = REAL_IMAGES, seed: int = 0) -> pd.DataFrame:
    """The metadata table of a synthetic HAM10000 of n images: columns METADATA_COLUMNS, rows in the
    real file's order (grouped by dx, then lesion). Ids look like HAM10000's and reveal no class."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D455441]))
    counts = class_counts(n)
    lesions: list[dict] = []  # one per lesion, with the number of its images
    for dx in FILE_ORDER:
        images = counts[dx]
        n_lesions = round(images * REAL_LESIONS[dx] / REAL_COUNTS[dx])
        n_lesions = min(images, max(min(images, 3), n_lesions))
        per = _images_per_lesion(rng, images, n_lesions)
        dxt = np.asarray(DX_TYPE_COUNTS[dx], float)
        types = rng.choice(len(DX_TYPES), n_lesions, p=dxt / dxt.sum())
        sexes = rng.choice(len(SEXES), n_lesions, p=np.asarray(SEX_WEIGHTS[dx]) / sum(SEX_WEIGHTS[dx]))
        locw = np.asarray(LOC_WEIGHTS[dx], float) + 0.05  # rare but possible everywhere
        locs = rng.choice(len(LOCALIZATIONS), n_lesions, p=locw / locw.sum())
        mean, std = AGE_MEAN_STD[dx]
        ages = np.clip(np.round(rng.normal(mean, std, n_lesions) / 5) * 5, 0, 85)
        ages[rng.random(n_lesions) < MISSING_AGE] = np.nan
        for i in range(n_lesions):
            lesions.append({"dx": dx, "images": int(per[i]), "dx_type": DX_TYPES[types[i]],
                            "age": float(ages[i]), "sex": SEXES[sexes[i]],
                            "localization": LOCALIZATIONS[locs[i]]})
    lesion_numbers = rng.permutation(len(lesions))
    image_numbers = iter(rng.permutation(n) + FIRST_IMAGE_NUMBER)
    rows = []
    for les, num in zip(lesions, lesion_numbers, strict=True):
        for _ in range(les["images"]):
            rows.append({"lesion_id": f"HAM_{num:07d}", "image_id": f"ISIC_{next(image_numbers):07d}",
                         "dx": les["dx"], "dx_type": les["dx_type"], "age": les["age"],
                         "sex": les["sex"], "localization": les["localization"]})
    df = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    df["_order"] = df["dx"].map({dx: i for i, dx in enumerate(FILE_ORDER)})
    df = df.sort_values(["_order", "lesion_id", "image_id"], kind="stable").drop(columns="_order")
    return df.reset_index(drop=True)


def mask_path(root: str | Path, image_id: str) -> Path:
    """Where `synthesize(..., masks=True)` puts an image's binary lesion mask (PNG, 0 or 255)."""
    return Path(root) / MASK_DIR / f"{image_id}_mask.png"


def part_of(image_number: int, n: int) -> int:
    """0 or 1: which images folder holds an image (the lower ids in part 1, as in HAM10000)."""
    first_part = round(n * REAL_PART_1 / REAL_IMAGES)
    return 0 if image_number - FIRST_IMAGE_NUMBER < first_part else 1


@dataclass(frozen=True)
class _Task:
    dx: str
    lesion_number: int
    image_number: int
    path: str
    mask_file: str | None


def _draw_chunk(seed: int, size: tuple[int, int], tasks: list[_Task], realism: str = "light") -> int:
    """Worker: draw and write a chunk of images; returns how many were written."""
    for t in tasks:
        jpeg, mask = draw_image(t.dx, seed, t.lesion_number, t.image_number, size, t.mask_file is not None,
                                realism)
        atomic_write_bytes(t.path, jpeg, fsync=False)
        if t.mask_file is not None and mask is not None:
            atomic_write_bytes(t.mask_file, mask, fsync=False)
    return len(tasks)


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _prepare_out(out: Path, params: SynthParams, force: bool) -> None:
    """Refuse to mix with unrelated files; with force, remove only the files synth writes."""
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} is a file, not a folder: choose a folder path")
    if not out.exists() or not any(out.iterdir()):
        return
    marker = _read_marker(out)
    if marker == params.to_json():
        return  # same options: resume (or confirm) a previous run
    if not force:
        if marker is None:
            why = "it is not empty and is not a `hamengine synth` output"
        else:
            old = ", ".join(f"{k}={marker.get(k)}" for k in ("n", "seed", "size", "masks", "version"))
            why = f"it holds a `hamengine synth` output made with other options ({old})"
        raise SynthError(f"--out {out}: {why}; choose an empty or new folder, or pass --force to "
                         f"replace its HAM10000 metadata and image folders (other files are kept)")
    for name in (METADATA_NAME, MARKER_NAME):
        (out / name).unlink(missing_ok=True)
    for name in (*PART_DIRS, MASK_DIR):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _mp_context():
    """fork is fastest (no re-import), but is unsafe once CUDA is initialised: then spawn."""
    import multiprocessing as mp

    torch = sys.modules.get("torch")
    cuda_live = bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())
    if sys.platform == "linux" and not cuda_live:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _run_tasks(seed: int, size: tuple[int, int], tasks: list[_Task], workers: int, progress: bool,
               realism: str = "light") -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    chunk = max(1, min(64, math.ceil(len(tasks) / max(1, workers * 8))))
    chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
    bar = Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn(), console=Console(stderr=True), disable=not progress)
    start = time.perf_counter()
    if workers <= 1 or len(chunks) == 1:
        with bar:
            tid = bar.add_task("synth", total=len(tasks), rate="")
            for c in chunks:
                bar.update(tid, advance=_draw_chunk(seed, size, c, realism),
                           rate=f"{bar.tasks[0].completed / (time.perf_counter() - start):.0f} img/s")
        return
    # Submit everything before the progress bar starts its refresh thread (fork + threads don't mix).
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_mp_context()) as pool:
        futures = [pool.submit(_draw_chunk, seed, size, c, realism) for c in chunks]
        try:
            with bar:
                tid = bar.add_task("synth", total=len(tasks), rate="")
                done = 0
                for fut in futures:  # in order; all chunks run concurrently anyway
                    done += fut.result()
                    rate = done / max(1e-9, time.perf_counter() - start)
                    bar.update(tid, completed=done, rate=f"{rate:.0f} img/s")
        except BaseException:  # a failed chunk or Ctrl-C: don't start the queued ones
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def synthesize(out: str | Path, n: int = REAL_IMAGES, seed: int = 0, size: tuple[int, int] = (600, 450),
               workers: int = 0, progress: bool = True, masks: bool = False, force: bool = False,
               realism: str = "light") -> Path:
    """Write a synthetic HAM10000 of n images (Kaggle layout) to `out` and return its path.

    Same n/seed/size -> byte-identical files for any `workers` (0 = all cores). With masks=True,
    HAM10000_masks/<image_id>_mask.png holds each image's binary lesion mask (0/255). A previous run
    with the same options is resumed (only missing images are drawn); a folder holding anything
    else is refused unless force=True."""
    width, height = (int(v) for v in size)
    if width < 16 or height < 16:
        raise SynthError(f"--size {width}x{height} is too small: use at least 16x16 (HAM10000 is 600x450)")
    if seed < 0:
        raise SynthError(f"--seed {seed} must be >= 0")
    if realism not in REALISMS:
        raise SynthError(f"--realism {realism!r} is not one of: {', '.join(REALISMS)}")
    params = SynthParams(n=int(n), seed=int(seed), size=(width, height), masks=bool(masks), realism=realism)
    meta = synth_metadata(params.n, params.seed)  # also validates n
    out = Path(out)
    _prepare_out(out, params, force)
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA_NAME).unlink(missing_ok=True)  # from here on the folder is incomplete
    atomic_write_bytes(str(out / MARKER_NAME), (json.dumps(params.to_json(), indent=2) + "\n").encode(), fsync=False)
    dirs = [out / d for d in PART_DIRS] + ([out / MASK_DIR] if masks else [])
    for d in dirs:
        d.mkdir(exist_ok=True)
        for stale in d.glob("*.tmp-*"):  # half-written files of an interrupted run
            stale.unlink()

    tasks = []
    for row in meta.itertuples(index=False):
        number = int(row.image_id[5:])
        path = out / PART_DIRS[part_of(number, params.n)] / f"{row.image_id}.jpg"
        mask = mask_path(out, row.image_id) if masks else None
        if path.exists() and (mask is None or mask.exists()):
            continue  # resuming: written atomically by an earlier run with the same options
        tasks.append(_Task(row.dx, int(row.lesion_id[4:]), number, str(path), str(mask) if mask else None))
    if tasks:
        workers = workers if workers and workers > 0 else len(os.sched_getaffinity(0))
        _run_tasks(params.seed, params.size, tasks, workers, progress, params.realism)

    # Images reach the disk before the CSV that declares the dataset complete. One sync of
    # everything costs far less than an fsync per image (10,015 journal commits).
    os.sync()
    atomic_write_bytes(out / METADATA_NAME, meta.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return out


def synth_summary(out: str | Path) -> dict:
    """Counts of a synthesized folder (for `hamengine synth --json`)."""
    out = Path(out)
    df = pd.read_csv(out / METADATA_NAME)
    marker = _read_marker(out) or {}
    return {"out": str(out), "images": int(len(df)), "lesions": int(df["lesion_id"].nunique()),
            "classes": {dx: int((df["dx"] == dx).sum()) for dx in CLASSES},
            "seed": marker.get("seed"), "size": marker.get("size"), "masks": marker.get("masks"),
            "realism": marker.get("realism", "light"), "mean_jpeg_bytes": _mean_jpeg_bytes(out)}


def _mean_jpeg_bytes(out: Path) -> int | None:
    sizes = [p.stat().st_size for d in PART_DIRS for p in (out / d).glob("*.jpg")]
    return round(sum(sizes) / len(sizes)) if sizes else None
