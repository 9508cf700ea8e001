"""Export a pack to FFCV: one `.beton` per split in PACK/ffcv/, recorded in the pack's manifest.json
under `exports.ffcv` with each file's sha256 (loaders/ffcv_record.py: the record and its checks).

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

Deterministic: FFCV's writer runs with ONE worker process (with more, workers race for pages and
the page order -- hence the bytes -- change from run to run); every page is zero-filled first, so
the same pack gives byte-identical .beton files. Each file is written to a temp name, fsynced and
renamed; the manifest record is written last (the manifest replaced atomically), so an interrupted
export is never taken for a complete one.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hamengine.config import ConfigError
from hamengine.fileio import fsync_dir
from hamengine.hooks import fire
from hamengine.loaders.ffcv_record import (
    DIR_NAME,
    FORMAT,
    VERSION,
    FFCVExportError,
    export_dir,
    export_lock,
    file_sha256,
    read_export,
    write_record,
)
from hamengine.loaders.records import EXPORTS, MANIFEST, Pack, PackError

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


# -- the images as FFCV will see them ------------------------------------------------------------
def _jpeg_entry(data: bytes, quality: int) -> tuple[bytes, int, int, bool]:
    """(jpeg bytes to store, width, height, re-encoded?). Reads only the JPEG header unless the
    image must be converted."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and im.mode in ("RGB", "L"):  # turbojpeg decodes both to RGB
            return data, im.width, im.height, False
        rgb = im.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), rgb.width, rgb.height, True


class _SplitImages:
    """Indexable (jpeg, width, height, label) rows of one split for FFCV's writer. Opens the pack
    lazily so the writer's worker process maps the shards itself."""

    def __init__(self, pack_path: Path, split: str, quality: int, reencode: set[int]):
        self.pack_path, self.split, self.quality, self.reencode = pack_path, split, quality, reencode
        self._pack: Pack | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self._open().num_samples(self.split)

    def _open(self) -> Pack:
        if self._pack is None:
            self._pack = Pack(self.pack_path, check_files=False)
            self._labels = self._pack.labels(self.split)
        return self._pack

    def __getitem__(self, i: int) -> tuple[tuple[bytes, int, int], int]:
        pack = self._open()
        data = pack.jpeg(self.split, i)
        if i in self.reencode:
            data, w, h, _ = _jpeg_entry(data, self.quality)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        return (data, w, h), int(self._labels[i])


def _scan(pack: Pack, split: str, quality: int) -> tuple[set[int], int]:
    """Check every image's header in this process (a worker that fails inside FFCV's writer would
    leave its progress loop waiting forever): -> (indices to re-encode, largest stored size)."""
    reencode, largest = set(), 0
    for i in range(pack.num_samples(split)):
        data = pack.jpeg(split, i)
        try:
            stored, _, _, converted = _jpeg_entry(data, quality)
        except Exception as e:  # PIL raises several types for broken data
            key = pack.keys(split)[i]
            raise PackError(f"{pack.path}: {split} sample {i} ({key}) is not a readable JPEG ({e}); "
                            f"`hamengine verify {pack.path}` lists the damage") from None
        if converted:
            reencode.add(i)
        largest = max(largest, len(stored))
    return reencode, largest


def _jpeg_field_class() -> type:
    """An RGBImageField that stores given JPEG bytes instead of re-encoding pixels. On disk it is a
    plain RGBImageField (the writer below records that type id), so any FFCV reader opens it."""
    from ffcv.fields import RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES

    class StoredJPEGField(RGBImageField):
        def __init__(self) -> None:
            super().__init__(write_mode="jpg")

        def encode(self, destination, value, malloc) -> None:  # type: ignore[override]
            data, width, height = value
            destination["mode"] = IMAGE_MODES["jpg"]
            destination["height"], destination["width"] = height, width
            destination["data_ptr"], storage = malloc(len(data))
            storage[:] = np.frombuffer(data, dtype=np.uint8)

    return StoredJPEGField


def _writer_class() -> type:
    from ffcv.fields import RGBImageField
    from ffcv.types import TYPE_ID_HANDLER, FieldDescType, HeaderType
    from ffcv.writer import DatasetWriter

    rgb_id = next(k for k, v in TYPE_ID_HANDLER.items() if v is RGBImageField)

    class Writer(DatasetWriter):
        def prepare(self) -> None:
            super().prepare()
            # FFCV looks a field's type id up by exact class: our subclass would be written as
            # "custom" (255). Rewrite the descriptors with RGBImageField's id.
            n = len(self.fields)
            with open(self.fname, "r+b") as fp:
                fp.seek(HeaderType.itemsize)
                desc = np.frombuffer(fp.read(n * FieldDescType.itemsize), dtype=FieldDescType).copy()
                for i, field in enumerate(self.fields.values()):
                    if isinstance(field, RGBImageField):
                        desc[i]["type_id"] = rgb_id
                fp.seek(HeaderType.itemsize)
                fp.write(desc.tobytes())

    return Writer


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


def _write_split(pack: Pack, split: str, out: Path) -> dict[str, Any]:
    from ffcv.fields import IntField

    quality = int(pack.manifest["image"].get("quality", 90))
    reencode, largest = _scan(pack, split, quality)
    page = MIN_PAGE
    while page < largest:
        page *= 2
    fields = {"image": _jpeg_field_class()(), "label": IntField()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        _chmod_default(tmp)
        writer = _writer_class()(tmp, fields, page_size=page, num_workers=1)  # 1: deterministic
        with _quiet_tqdm():
            writer.from_indexed_dataset(_SplitImages(pack.path, split, quality, reencode), chunksize=256)
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
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write PACK/ffcv/<split>.beton for every non-empty split, then record them in the pack's
    manifest (exports.ffcv); returns the record. An up-to-date export is kept unless `force`."""
    require_ffcv()
    pack = pack if isinstance(pack, Pack) else Pack(pack)
    existing = None if force else read_export(pack)
    if existing is not None:
        return _up_to_date(pack, existing, log)
    out_dir = export_dir(pack)
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise FFCVExportError(f"{out_dir}: cannot create the FFCV export folder ({e.strerror}); the pack "
                              f"folder must be writable (or copy the pack somewhere writable)") from None
    with export_lock(out_dir):
        existing = None if force else read_export(pack)  # another process may have finished it meanwhile
        if existing is not None:
            return _up_to_date(pack, existing, log)
        fire("ffcv.export_locked", pack=str(pack.path))
        record = _export_locked(pack, out_dir, progress)
    if log:
        log(f"wrote {', '.join(e['file'] for e in record['splits'].values())} to {out_dir} (recorded in "
            f"{pack.path / MANIFEST} under {EXPORTS}.{DIR_NAME})")
    return record


def _up_to_date(pack: Pack, record: dict[str, Any], log: Callable[[str], None] | None) -> dict[str, Any]:
    if log:
        log(f"{export_dir(pack)} is up to date with the pack (recorded in {pack.path / MANIFEST})")
    return record


def _export_locked(pack: Pack, out_dir: Path, progress: bool) -> dict[str, Any]:
    from importlib.metadata import version

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from hamengine.loaders.base import verify_shards

    splits = pack.splits
    for split in splits:
        verify_shards(pack, split)  # export only what the manifest vouches for
    # The old record goes first: while files are replaced, nothing vouches for a mix of old and new.
    write_record(pack, None)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # where development versions kept the record
    total = sum(pack.num_samples(s) for s in splits)
    entries: dict[str, Any] = {}
    with Progress(TextColumn("exporting to FFCV: {task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("", total=total)
        for split in splits:
            bar.update(task, description=split)
            try:
                entries[split] = _write_split(pack, split, out_dir / f"{split}.beton")
            except OSError as e:
                raise FFCVExportError(f"{out_dir / (split + '.beton')}: cannot write ({e.strerror})") from None
            bar.advance(task, pack.num_samples(split))
    fsync_dir(out_dir)  # the renames are durable before the record that lists them
    record = {"format": FORMAT, "version": VERSION, "dir": DIR_NAME, "ffcv_version": version("ffcv"),
              "fields": {"image": "RGBImageField, jpg mode: the pack's JPEG bytes as stored",
                         "label": "IntField: class index into the pack's classes"},
              "classes": list(pack.classes), "image_size": pack.image_size, "splits": entries}
    write_record(pack, record)
    return record


def beton_for(pack: Pack, split: str, auto_export: bool = True, verify: bool = True,
              log: Callable[[str], None] | None = None) -> Path:
    """Path of split's .beton, exporting first when the export is missing or incomplete; with
    `verify` its sha256 is checked against the manifest's record (damage fails here, before the
    first batch)."""
    if pack.num_samples(split) == 0:
        raise FFCVExportError(f"{pack.path}: split {split!r} is empty; nothing to load")
    manifest = read_export(pack)
    if manifest is None:
        if not auto_export:
            raise FFCVExportError(f"{pack.path / MANIFEST} records no complete FFCV export of this pack; "
                                  f"run `hamengine export-ffcv {pack.path}`")
        manifest = export_ffcv(pack, progress=True, log=log)
    info = manifest["splits"][split]
    path = export_dir(pack) / info["file"]
    if verify and file_sha256(path) != info["sha256"]:
        raise FFCVExportError(f"{path}: sha256 differs from the one recorded in {pack.path / MANIFEST} "
                              f"(damaged or replaced); run `hamengine export-ffcv {pack.path} --force` to rebuild it")
    return path


