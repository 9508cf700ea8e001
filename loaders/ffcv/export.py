"""Export a pack to FFCV: one `.beton` per split in PACK/ffcv/, recorded in the pack's manifest.json
under `exports.ffcv` with each file's sha256 (loaders/pack/ffcv_record.py: the record and its checks).

Same split, same samples in the same (storage) order, same labels, and the same stored JPEG bytes:
each image goes into FFCV's `RGBImageField` in JPEG mode *as the pack stores it* -- FFCV's own
writer would decode and re-encode (a second lossy pass, and not bit-stable across OpenCV builds).
Only a JPEG that libjpeg-turbo cannot decode to RGB (CMYK, not in packs hamengine writes) is
decoded and re-encoded at the pack's quality and size; the record counts them (`reencoded`).
Sample i of `<split>.beton` is sample i of the pack's split, so the loaders' epoch plans (indices
into the split) index the .beton directly.

The pack's fingerprint (resident cache keys, run records) leaves the `exports` key out, so recording
an export does not change it. Repacking writes a manifest without the record: the next use
exports again (the files are deterministic, so the result is the same bytes).

Modes (`--mode`, FFCV's own write modes), each an independent export with its own folder and record:
- jpg (PACK/ffcv/, `exports.ffcv`): the pack's JPEG bytes as above; what `--loader ffcv` reads.
- raw (PACK/ffcv-raw-<S>/): the pixels the resident cache holds for output side S (shorter side S,
  the split's common aspect; loaders/kinds/resident.py), uint8 HWC, so FFCV and the resident loader read
  identical pixels and neither decodes a JPEG per epoch.
- proportion (PACK/ffcv-proportion/): FFCV's mixed mode over the pack's decoded pixels: each image
  stored JPEG-compressed by FFCV (OpenCV, at the pack's quality) with probability 0.5, else raw.
  FFCV draws that choice from NumPy's global generator in its worker: not byte-stable across runs.

Deterministic (jpg, raw): FFCV's writer runs with ONE worker process (with more, workers race for pages and
the page order -- hence the bytes -- change from run to run); every page is zero-filled first, so
the same pack gives byte-identical .beton files. Each file is written to a temp name, fsynced and
renamed; the manifest record is written last (the manifest replaced atomically), so an interrupted
export is never taken for a complete one.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hamengine.config import StrEnum
from hamengine.errors import ConfigError
from hamengine.fileio import file_sha256, fsync_dir
from hamengine.hooks import fire
from hamengine.loaders.ffcv.rows import (
    SplitImages,
    SplitPixels,
    jpeg_entry,
    jpeg_field_class,
    resident_cache_file,
    writer_class,
)
from hamengine.loaders.kinds.base import verify_shards
from hamengine.loaders.pack.ffcv_record import (
    DIR_NAME,
    FORMAT,
    VERSION,
    FFCVExportError,
    export_dir,
    export_lock,
    mode_options,
    read_export,
    write_record,
)
from hamengine.loaders.pack.records import EXPORTS, MANIFEST, Pack, PackError


class ExportMode(StrEnum):
    JPG = "jpg"  # the pack's JPEG bytes, as stored
    RAW = "raw"  # the resident cache's pixels at an output side S
    PROPORTION = "proportion"  # FFCV's mix: half JPEG (re-encoded by FFCV), half raw


PROPORTION_COMPRESS = 0.5  # FFCV's compress_probability in proportion mode (its ImageNet examples' value)


def export_name(mode: ExportMode | str, size: int | None = None) -> str:
    """The export's folder and manifest key: ffcv, ffcv-raw-<S>, ffcv-proportion."""
    mode = ExportMode(mode)
    if mode == ExportMode.JPG:
        return DIR_NAME
    if mode == ExportMode.RAW:
        if not size or size < 8:
            raise ConfigError("export-ffcv --mode raw stores the resident cache's pixels for one output side: "
                              "pass --size S (the side the loaders will output, e.g. 224)")
        return f"{DIR_NAME}-raw-{int(size)}"
    return f"{DIR_NAME}-proportion"


MIN_PAGE = 1 << 21  # FFCV's smallest page (2 MiB); a page must hold the largest sample
INSTALL_HINT = (
    "FFCV is not installed (it is an optional extra). Install its system libraries, then the extra: "
    "on Debian/Ubuntu `apt-get install pkg-config g++ libopencv-dev libturbojpeg0-dev` (or run "
    ".ci/install-ffcv.sh from the hamengine repository), then `pip install 'hamengine[ffcv]'`. "
    "Without FFCV use --loader resident, dali or torch.")


def ffcv_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ffcv") is not None


def require_ffcv() -> Any:
    """Import ffcv, or raise ConfigError with the install instructions (the user asked for it)."""
    try:
        import ffcv  # noqa: F401
        import ffcv.fields  # the C extension loads here: a broken build fails now, not mid-epoch
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} (import failed: {e})") from None
    return ffcv


def _chmod_default(path: str) -> None:
    """mkstemp creates 0600; give the file the permissions a plain open() would (0666 - umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _scan(pack: Pack, split: str, quality: int) -> tuple[set[int], int]:
    """Check every image's header in this process (a worker that fails inside FFCV's writer would
    leave its progress loop waiting forever): -> (indices to re-encode, largest stored size)."""
    reencode, largest = set(), 0
    for i in range(pack.num_samples(split)):
        data = pack.jpeg(split, i)
        try:
            stored, _, _, converted = jpeg_entry(data, quality)
        except Exception as e:  # PIL raises several types for broken data
            key = pack.keys(split)[i]
            raise PackError(f"{pack.path}: {split} sample {i} ({key}) is not a readable JPEG ({e}); "
                            f"`hamengine verify {pack.path}` lists the damage") from None
        if converted:
            reencode.add(i)
        largest = max(largest, len(stored))
    return reencode, largest


@contextmanager
def _quiet_tqdm():
    """FFCV's writer draws tqdm bars on stderr; we draw our own (rich), so silence its for the call."""
    import functools

    import ffcv.writer

    old = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(old, disable=True)
    try:
        yield
    finally:
        ffcv.writer.tqdm = old


def _write_split(pack: Pack, split: str, out: Path, mode: ExportMode = ExportMode.JPG,
                 size: int | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    from ffcv.fields import IntField, RGBImageField

    quality = int(pack.manifest["image"].get("quality", 90))
    reencode, largest = _scan(pack, split, quality)
    if mode == ExportMode.JPG:
        image_field, rows = jpeg_field_class()(), SplitImages(pack.path, split, quality, reencode)
    else:
        cache = resident_cache_file(pack, split, size, cache_dir) if mode == ExportMode.RAW else None
        rows = SplitPixels(pack.path, split, cache)
        if cache is not None:
            h, w = np.load(cache, mmap_mode="r", allow_pickle=False).shape[2:]
            largest = 3 * h * w
        else:  # proportion: a raw image is the pack image's pixels
            largest = max(largest, 3 * pack.image_size * pack.image_size * 4)
        image_field = RGBImageField(write_mode=str(mode), jpeg_quality=quality,
                                    compress_probability=PROPORTION_COMPRESS)
    page = MIN_PAGE
    while page < largest:
        page *= 2
    fields = {"image": image_field, "label": IntField()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        _chmod_default(tmp)
        writer = writer_class()(tmp, fields, page_size=page, num_workers=1)  # 1: deterministic
        with _quiet_tqdm():
            writer.from_indexed_dataset(rows, chunksize=256)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    keys = "\n".join(pack.keys(split)).encode()
    return {"file": out.name, "samples": pack.num_samples(split), "bytes": out.stat().st_size,
            "sha256": file_sha256(out), "page_size": page, "reencoded": len(reencode),
            "keys_sha256": hashlib.sha256(keys).hexdigest(),
            "labels_sha256": hashlib.sha256(pack.labels(split).astype("<i8").tobytes()).hexdigest()}


# -- the record in the pack's manifest -----------------------------------------------------------
def export_ffcv(pack: Pack | str | Path, force: bool = False, progress: bool = True,
                log: Callable[[str], None] | None = None, mode: ExportMode | str = ExportMode.JPG,
                size: int | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Write PACK/<name>/<split>.beton for every non-empty split (name: export_name(mode, size)),
    then record them in the pack's manifest (exports.<name>); returns the record. An up-to-date
    export is kept unless `force`. raw reads (or first builds) the resident cache in `cache_dir`
    (default PACK/cache/)."""
    mode = ExportMode(mode)
    name = export_name(mode, size)
    require_ffcv()
    pack = pack if isinstance(pack, Pack) else Pack(pack)
    existing = None if force else read_export(pack, name=name)
    if existing is not None:
        return _up_to_date(pack, existing, log, name)
    out_dir = export_dir(pack, name)
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise FFCVExportError(f"{out_dir}: cannot create the FFCV export folder ({e.strerror}); the pack "
                              f"folder must be writable (or copy the pack somewhere writable)") from None
    with export_lock(out_dir):
        existing = None if force else read_export(pack, name=name)  # another process may have finished it meanwhile
        if existing is not None:
            return _up_to_date(pack, existing, log, name)
        fire("ffcv.export_locked", pack=str(pack.path))
        record = _export_locked(pack, out_dir, progress, mode, size, name, cache_dir)
    if log:
        log(f"wrote {', '.join(e['file'] for e in record['splits'].values())} to {out_dir} (recorded in "
            f"{pack.path / MANIFEST} under {EXPORTS}.{name})")
    return record


def _up_to_date(pack: Pack, record: dict[str, Any], log: Callable[[str], None] | None,
                name: str = DIR_NAME) -> dict[str, Any]:
    if log:
        log(f"{export_dir(pack, name)} is up to date with the pack (recorded in {pack.path / MANIFEST})")
    return record


FIELD_TEXT = {
    ExportMode.JPG: "RGBImageField, jpg mode: the pack's JPEG bytes as stored",
    ExportMode.RAW: "RGBImageField, raw mode: the resident cache's uint8 pixels (shorter side S, common aspect)",
    ExportMode.PROPORTION: f"RGBImageField, proportion mode: the pack's decoded pixels, JPEG-encoded by FFCV "
                           f"with probability {PROPORTION_COMPRESS}, else raw",
}


def _export_locked(pack: Pack, out_dir: Path, progress: bool, mode: ExportMode = ExportMode.JPG,
                   size: int | None = None, name: str = DIR_NAME, cache_dir: str | None = None) -> dict[str, Any]:
    from importlib.metadata import version

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


    splits = pack.splits
    for split in splits:
        verify_shards(pack, split)  # export only what the manifest vouches for
    # The old record goes first: while files are replaced, nothing vouches for a mix of old and new.
    write_record(pack, None, name)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # where development versions kept the record
    total = sum(pack.num_samples(s) for s in splits)
    entries: dict[str, Any] = {}
    with Progress(TextColumn("exporting to FFCV: {task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("", total=total)
        for split in splits:
            bar.update(task, description=split)
            try:
                entries[split] = _write_split(pack, split, out_dir / f"{split}.beton", mode, size, cache_dir)
            except OSError as e:
                raise FFCVExportError(f"{out_dir / (split + '.beton')}: cannot write ({e.strerror})") from None
            bar.advance(task, pack.num_samples(split))
    fsync_dir(out_dir)  # the renames are durable before the record that lists them
    record = {"format": FORMAT, "version": VERSION, "dir": name, "mode": str(mode), "output_size": size,
              "ffcv_version": version("ffcv"),
              "fields": {"image": FIELD_TEXT[mode], "label": "IntField: class index into the pack's classes"},
              "classes": list(pack.classes), "image_size": pack.image_size, "splits": entries}
    write_record(pack, record, name)
    return record


def beton_for(pack: Pack, split: str, auto_export: bool = True, verify: bool = True,
              log: Callable[[str], None] | None = None, mode: ExportMode | str = ExportMode.JPG,
              size: int | None = None) -> Path:
    """Path of split's .beton (of the export of `mode`, at output side `size` for raw), exporting
    first when the export is missing or incomplete; with `verify` its sha256 is checked against the
    manifest's record (damage fails here, before the first batch)."""
    if pack.num_samples(split) == 0:
        raise FFCVExportError(f"{pack.path}: split {split!r} is empty; nothing to load")
    name = export_name(mode, size)
    manifest = read_export(pack, name=name)
    if manifest is None:
        if not auto_export:
            raise FFCVExportError(f"{pack.path / MANIFEST} records no complete FFCV export of this pack; "
                                  f"run `hamengine export-ffcv {pack.path}{mode_options(name)}`")
        manifest = export_ffcv(pack, progress=True, log=log, mode=mode, size=size)
    info = manifest["splits"][split]
    path = export_dir(pack, name) / info["file"]
    if verify and file_sha256(path) != info["sha256"]:
        raise FFCVExportError(f"{path}: sha256 differs from the one recorded in {pack.path / MANIFEST} "
                              f"(damaged or replaced); run `hamengine export-ffcv {pack.path}{mode_options(name)} "
                              f"--force` to rebuild it")
    return path


