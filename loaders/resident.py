"""`resident`: decode the split once into ONE uint8 tensor [N, 3, H, W] in RAM or GPU memory, then
build every batch with a handful of batched tensor ops (no per-sample Python, no JPEG decode).

Cache geometry: images are resized (antialiased) so their shorter side is S (the output size) --
the eval transform's own resize -- and the longer side to the split's common aspect ratio
(H x W = S x int(S * w / h) for landscape images, e.g. 224 x 298 for HAM10000's 4:3); an image of
another aspect ratio has its longer side center-cropped or zero-padded to fit. Why S and not more:
eval is then an exact slice (identical to the torch loader's resize + center crop), the cache is
the smallest that still holds the whole eval view, and a batch gathers the fewest bytes; train
crops (area >= 35%) are upsampled at most ~1.7x from it.

Disk cache: PACK/cache/ (or cfg.cache_dir) `resident-<split>-<pack fingerprint>-<H>x<W>.npy`,
written through a temp file + fsync + os.replace, so a second run starts without decoding and a
half-written cache is never read. Building it from a pack verifies the split's shard hashes first.

Per train batch: index_select the uint8 rows -> float -> one grid_sample doing crop + resize +
rotation + flips (augment.warp_*) -> colour jitter + normalize as one batched 3x3 matmul -> cast.
On a GPU the parameters are drawn by a CUDA generator: only the batch's indices cross to the device.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from hamengine.config import AugPreset, LoaderConfig
from hamengine.loaders import augment
from hamengine.loaders.base import Batch, Loader, mix_seed, verify_shards
from hamengine.loaders.records import Pack, PackError

CACHE_VERSION = 1


def _decode(data: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_jpeg(buf, mode=ImageReadMode.RGB, device=device)


def cache_shape(pack: Pack, split: str, size: int) -> tuple[int, int]:
    """(H, W) of the cache: shorter side `size`, longer side by the first image's aspect ratio."""
    if pack.num_samples(split) == 0:
        return size, size
    img = _decode(pack.jpeg(split, 0))
    h, w = img.shape[1:]
    if w >= h:  # torchvision's resize formula: int(size * long / short)
        return size, int(size * w / h)
    return int(size * h / w), size


def cache_bytes(pack: Pack, split: str, size: int) -> int:
    h, w = cache_shape(pack, split, size)
    return pack.num_samples(split) * 3 * h * w


def fit_to_cache(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 [3, h0, w0] -> [3, h, w]: shorter side to min(h, w) (antialiased), then center crop/pad."""
    img = TF.resize(img, [min(h, w)], antialias=True)
    if tuple(img.shape[1:]) != (h, w):
        img = TF.center_crop(img, [h, w])  # pads with zeros when smaller
    return img


def cache_path(pack: Pack, split: str, h: int, w: int, cache_dir: str | None) -> Path:
    root = Path(cache_dir) if cache_dir else pack.path / "cache"
    return root / f"resident-v{CACHE_VERSION}-{split}-{pack.fingerprint[:20]}-{h}x{w}.npy"


def _progress(total: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=total < 500)


def decode_split(pack: Pack, split: str, h: int, w: int, device: torch.device, workers: int) -> torch.Tensor:
    """uint8 [N, 3, h, w] on `device`: every image of the split, decoded once (threads on CPU; GPU
    decode in chunks with CUDA)."""
    n = pack.num_samples(split)
    out = torch.empty((n, 3, h, w), dtype=torch.uint8, device=device)
    chunk = 64
    starts = list(range(0, n, chunk))

    def work(start: int) -> int:
        stop = min(n, start + chunk)
        if device.type == "cuda":  # batched nvJPEG decode, resize on the GPU
            bufs = [torch.frombuffer(bytearray(pack.jpeg(split, i)), dtype=torch.uint8) for i in range(start, stop)]
            imgs = decode_jpeg(bufs, mode=ImageReadMode.RGB, device=device)
            for i, img in zip(range(start, stop), imgs, strict=True):
                out[i] = fit_to_cache(img, h, w)
        else:  # torch ops release the GIL: threads decode in parallel
            for i in range(start, stop):
                out[i] = fit_to_cache(_decode(pack.jpeg(split, i)), h, w)
        return stop - start

    with _progress(n, f"decoding {split} into the resident cache") as prog:
        task = prog.add_task("decode", total=n)
        if device.type == "cuda" or workers <= 1:
            for s in starts:
                prog.advance(task, work(s))
        else:
            with ThreadPoolExecutor(workers) as pool:
                for k in pool.map(work, starts):
                    prog.advance(task, k)
    return out


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_build_cache(pack: Pack, split: str, size: int, device: torch.device, cfg: LoaderConfig,
                        workers: int, verify: bool = True) -> torch.Tensor:
    """The split's uint8 cache on `device`, from disk when present, else decoded (and saved)."""
    h, w = cache_shape(pack, split, size)
    path = cache_path(pack, split, h, w, cfg.cache_dir)
    n = pack.num_samples(split)
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (n, 3, h, w) and arr.dtype == np.uint8:
                return torch.from_numpy(arr).to(device)
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it below (the cache is derived data)
    if verify:
        verify_shards(pack, split)
    cache = decode_split(pack, split, h, w, device, workers)
    try:
        _save_atomic(path, cache.cpu().numpy())
    except OSError as e:  # read-only pack folder: run without a disk cache, say so once
        import warnings

        warnings.warn(f"resident cache not saved to {path} ({e.strerror}); set cache_dir to keep it",
                      stacklevel=2)
    return cache


class ResidentLoader(Loader):
    kind = "resident"

    def __init__(self, pack: Pack, split: str, cfg: LoaderConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1, workers: int = 1, verify: bool = True):
        super().__init__(pack, split, cfg, device, rank, world_size)
        if len(pack.classes) == 0:
            raise PackError(f"{pack.path}: the pack lists no classes")
        self.cache = load_or_build_cache(pack, split, self.size, self.device, cfg, workers, verify)
        self.cache_hw = tuple(self.cache.shape[2:])
        self.labels_dev = torch.from_numpy(self.labels).to(self.device)
        self.augment = self.train and self.aug.preset != AugPreset.NONE
        # Work in fp32 on CPU (grid_sample / matmul have no fast bf16 CPU path); in the output
        # dtype on GPUs (halves the bytes moved).
        self.work_dtype = torch.float32 if self.device.type == "cpu" else (
            torch.float32 if self.dtype == torch.float32 else torch.float16 if self.dtype == torch.float16
            else torch.bfloat16)

    def _eval_batch(self, idx: torch.Tensor) -> torch.Tensor:
        h, w = self.cache_hw
        top, left = (h - self.size) // 2, (w - self.size) // 2
        src = self.cache.index_select(0, idx)[:, :, top:top + self.size, left:left + self.size]
        return augment.normalize_u8(src, self.work_dtype)

    def _train_batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = idx.shape[0]
        h, w = self.cache_hw
        p = augment.sample_params(gen, n, h, w, self.aug)
        src = self.cache.index_select(0, idx).to(self.work_dtype)  # N,3,H,W
        x = augment.warp_batch(src, p, self.size, self.aug.rotation)  # N,3,S,S in [0, 255]
        if self.aug.has_jitter:
            mg = augment.mean_gray(x)
            m, t = augment.colour_affine(p, mg, n, self.device)
            return augment.apply_colour(x, m, t, clamp=True)
        m, t = augment.colour_affine(None, None, n, self.device)
        return augment.apply_colour(x, m, t, clamp=False)

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(self.cfg.seed, self.epoch, self.rank, 0xA06))
        for batch in plan.batches():
            idx = torch.from_numpy(batch).to(self.device, non_blocking=True)
            with torch.no_grad():
                images = self._train_batch(idx, gen) if self.augment else self._eval_batch(idx)
            labels = self.labels_dev.index_select(0, idx)
            yield self.finish(images), labels

    def close(self) -> None:
        self.cache = torch.empty(0, dtype=torch.uint8)

