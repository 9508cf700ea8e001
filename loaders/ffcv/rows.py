"""What an FFCV export stores per sample: the rows FFCV's writer reads (pack JPEG bytes as stored,
or uint8 pixels), the field that stores given JPEG bytes, and the writer that records its type id.
Used by loaders/ffcv/export.py; FFCV is imported inside the functions (it is an optional extra)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from hamengine.config import LoaderConfig
from hamengine.loaders.kinds.resident import cache_path, cache_shape, load_or_build_cache
from hamengine.loaders.pack.ffcv_record import FFCVExportError
from hamengine.loaders.pack.records import Pack
from hamengine.runtime import cpu_count


def jpeg_entry(data: bytes, quality: int) -> tuple[bytes, int, int, bool]:
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


class _SplitRows:
    """Indexable rows of one split for FFCV's writer. Opens the pack (and `cache_file`, memory-mapped)
    lazily, so the writer's worker process maps the files itself."""

    def __init__(self, pack_path: Path, split: str, cache_file: Path | None = None):
        self.pack_path, self.split, self.cache_file = pack_path, split, cache_file
        self._pack: Pack | None = None
        self._labels: np.ndarray | None = None
        self._cache: np.ndarray | None = None

    def __len__(self) -> int:
        return self._open().num_samples(self.split)

    def _open(self) -> Pack:
        if self._pack is None:
            self._pack = Pack(self.pack_path, check_files=False)
            self._labels = self._pack.labels(self.split)
            if self.cache_file is not None:
                self._cache = np.load(self.cache_file, mmap_mode="r", allow_pickle=False)  # [N, 3, H, W]
        return self._pack


class SplitImages(_SplitRows):
    """(jpeg, width, height) and label rows: the pack's JPEG bytes as stored (re-encoded only where
    `reencode` says so)."""

    def __init__(self, pack_path: Path, split: str, quality: int, reencode: set[int]):
        super().__init__(pack_path, split)
        self.quality, self.reencode = quality, reencode

    def __getitem__(self, i: int) -> tuple[tuple[bytes, int, int], int]:
        pack = self._open()
        data = pack.jpeg(self.split, i)
        if i in self.reencode:
            data, w, h, _ = jpeg_entry(data, self.quality)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        return (data, w, h), int(self._labels[i])


class SplitPixels(_SplitRows):
    """(uint8 HWC pixels, label) rows for FFCV's RGBImageField in raw / proportion mode: raw reads the
    resident cache file (`cache_file`), proportion decodes the pack's JPEG (FFCV re-encodes it with
    probability PROPORTION_COMPRESS)."""

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        pack = self._open()
        if self._cache is not None:
            pixels = np.ascontiguousarray(self._cache[i].transpose(1, 2, 0))  # H x W x 3
        else:
            from PIL import Image

            with Image.open(io.BytesIO(pack.jpeg(self.split, i))) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return pixels, int(self._labels[i])


def resident_cache_file(pack: Pack, split: str, size: int, cache_dir: str | None = None) -> Path:
    """The resident cache file for output side `size` (built now if missing): raw mode's pixels."""
    import torch


    h, w = cache_shape(pack, split, size)
    path = cache_path(pack, split, h, w, cache_dir)
    load_or_build_cache(pack, split, size, torch.device("cpu"), LoaderConfig(size=size, cache_dir=cache_dir),
                        cpu_count(), verify=False)
    if not path.is_file():
        raise FFCVExportError(f"{path}: the resident cache could not be saved, and --mode raw exports its "
                              f"pixels; the pack folder must be writable")
    return path


def jpeg_field_class() -> type:
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


def writer_class() -> type:
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


