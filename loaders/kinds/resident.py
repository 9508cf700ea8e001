"""`resident`: decode the split once into ONE uint8 tensor [N, 3, H, W] in RAM or GPU memory, then
build every batch with a handful of batched tensor ops (no per-sample Python, no JPEG decode).

Cache geometry: images are resized (antialiased) so their shorter side is S (the output size) --
the eval transform's own resize -- and the longer side to the split's common aspect ratio
(H x W = S x int(S * w / h) for landscape images, e.g. 224 x 298 for HAM10000's 4:3); an image of
another aspect ratio has its longer side center-cropped or zero-padded to fit. Why S and not more:
eval is then an exact slice (identical to the torch loader's resize + center crop), the cache is
the smallest that still holds the whole eval view, and a batch gathers the fewest bytes; train
crops (area >= 35%) are upsampled at most ~1.7x from it.

Disk cache: PACK/cache/ (or cfg.cache_dir) `resident-v<N>-<split>-<pack fingerprint>-<H>x<W>-<decoder>.npy`
(decoder: libjpeg on CPU threads, nvjpeg on CUDA; caches from different decoders are never mixed),
written through a temp file + fsync + os.replace, so a second run starts without decoding and a
half-written cache is never read. Building it from a pack verifies the split's shard hashes first.

Per train batch: index_select the uint8 rows -> float -> one grid_sample doing crop + resize +
rotation + flips (augment.warp_*) -> colour jitter + normalize as one batched 3x3 matmul -> cast.
Crop-flip on CPU (no rotation, no jitter) skips grid_sample (`kernel`): with OpenCV installed,
crop_cv.CropFlipCV resizes each sample of an interleaved copy of the cache with OpenCV's SIMD
fixed-point bilinear, flips it, and normalizes + casts through a 256-entry lookup table per channel
into the consumer's memory format (~2.5x cheaper than the torch path); without OpenCV, augment.crop_flip_separable gathers + blends the 2 source rows of each
output row straight from the uint8 cache, then the 2 columns of each output column.
Augmentation parameters are drawn on the CPU (one generator per batch, seeded from (seed, epoch, rank,
k)) and cross to a GPU in one pinned non_blocking copy, with the batch's indices: no host sync per
batch, and a CUDA run augments exactly as a CPU run does.
"""
from __future__ import annotations

import multiprocessing as mp
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from hamengine.config import AugConfig, AugPreset, LoaderConfig
from hamengine.errors import ConfigError
from hamengine.fileio import atomic_output
from hamengine.loaders.kinds import augment as augment_mod
from hamengine.loaders.kinds import crop_cv
from hamengine.loaders.kinds.base import (
    Batch,
    Loader,
    mix_seed,
    shutdown_workers,
    tune_worker_malloc,
    verify_shards,
)
from hamengine.loaders.kinds.stream import StreamPrefetcher
from hamengine.loaders.kinds.torch_loader import worker_context
from hamengine.loaders.pack.records import Pack, PackError

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


def decoder_name(device: torch.device) -> str:
    """Which JPEG decoder fills the cache: decoders differ within JPEG tolerance, so caches built by
    different decoders are never mixed (the name is part of the cache file's name)."""
    return "nvjpeg" if torch.device(device).type == "cuda" else "libjpeg"


def cache_path(pack: Pack, split: str, h: int, w: int, cache_dir: str | None, decoder: str = "libjpeg") -> Path:
    root = Path(cache_dir) if cache_dir else pack.path / "cache"
    return root / f"resident-v{CACHE_VERSION}-{split}-{pack.fingerprint[:20]}-{h}x{w}-{decoder}.npy"


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
            # torchvision's CUDA decode_jpeg runs on its own stream, unordered with ours
            # (pytorch/vision#9606): before the chunk's decoded tensors are freed (and their memory
            # reused by the next chunk while our resizes may still be queued), wait for both streams.
            # One sync per 64 images, at cache build only: never in the training loop.
            torch.cuda.synchronize(device)
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
    with atomic_output(path) as f:
        np.save(f, array, allow_pickle=False)


def load_or_build_cache(pack: Pack, split: str, size: int, device: torch.device, cfg: LoaderConfig,
                        workers: int, verify: bool = True) -> torch.Tensor:
    """The split's uint8 cache on `device`, from disk when present, else decoded (and saved)."""
    h, w = cache_shape(pack, split, size)
    path = cache_path(pack, split, h, w, cfg.cache_dir, decoder_name(device))
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


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_budget(cfg: LoaderConfig, device: torch.device) -> int:
    """Bytes the resident cache may take: cfg.memory_budget_gb, or half the free memory of the device."""
    if cfg.memory_budget_gb > 0:
        return int(cfg.memory_budget_gb * (1 << 30))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return _available_ram() // 2



class BatchMaker:
    """Builds batch k of an epoch from the cache: the same code in-process (GPU) and in the CPU
    worker processes. Parameters come from a generator seeded by (seed, epoch, rank, k), so a batch
    does not depend on which process made it. Intermediates live in buffers reused batch to batch
    (fresh 100 MB tensors cost more in page faults than the arithmetic on them)."""

    def __init__(self, cache: torch.Tensor, labels: torch.Tensor, size: int, aug: AugConfig, augment: bool,
                 seed: int, rank: int, work_dtype: torch.dtype, out_dtype: torch.dtype,
                 share_output: bool = False, ring: torch.Tensor | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        # The separable crop-flip path views the cache as [M*3*H, W] rows: it must be contiguous
        # (a hand-made Fortran-order .npy would not be); copied once here, before workers fork.
        cache = cache if cache.is_contiguous() else cache.contiguous()
        self.cache, self.labels, self.size, self.aug = cache, labels, size, aug
        self.augment, self.seed, self.rank, self.work_dtype = augment, seed, rank, work_dtype
        self.out_dtype, self.share_output = out_dtype, share_output
        # Batches are written in the consumer's memory format: a channels_last conversion after the
        # fact is a second full pass over the float batch in the training process.
        self.memory_format = memory_format
        self.ring = ring  # [R, N, 3, S, S] shared train output slots (ResidentLoader), or None
        self.hw = tuple(cache.shape[2:])
        self._bufs: dict[str, torch.Tensor] = {}
        # The train kernel: "opencv" / "separable" (CPU crop-flip), "grid-sample" (rotation or jitter,
        # or on a GPU), "none" (eval: a slice of the cache). bench loader records it.
        crop_flip_cpu = augment and not aug.rotation and not aug.has_jitter and cache.device.type == "cpu"
        self.cv_crop: crop_cv.CropFlipCV | None = None
        if crop_flip_cpu and crop_cv.available(out_dtype):
            a, b = augment_mod.normalize_coefficients(cache.device)
            self.cv_crop = crop_cv.CropFlipCV(cache, size, out_dtype, a, b)
            # Only the OpenCV kernel reads this maker's cache: keep its interleaved copy (made before
            # workers fork, so they share it); the planar one is dropped (ResidentLoader takes this one).
            self.cache = self.cv_crop.cache
        self.kernel = ("none" if not augment else "opencv" if self.cv_crop is not None
                       else "separable" if crop_flip_cpu else "grid-sample")
        if augment and aug.rotation:
            augment_mod.rotation_masks(size, cache.device)  # build before workers fork: shared pages

    def _buf(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        b = self._bufs.get(name)
        if b is None or tuple(b.shape) != shape:
            b = self._bufs[name] = torch.empty(shape, dtype=dtype, device=self.cache.device)
        return b

    def eval_batch(self, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h, w = self.hw
        top, left = (h - self.size) // 2, (w - self.size) // 2
        src = self.cache.index_select(0, idx)[:, :, top:top + self.size, left:left + self.size]
        x = self._buf("eval", tuple(src.shape), self.work_dtype).copy_(src)  # the exact eval view: a slice
        a, b = augment_mod.normalize_coefficients(x.device, x.dtype)
        return out.copy_(x.mul_(a).add_(b))

    def train_batch(self, idx: torch.Tensor, gen: torch.Generator, out: torch.Tensor) -> torch.Tensor:
        """Writes batch idx into `out` (the output dtype)."""
        n = idx.shape[0]
        h, w = self.hw
        aug, s = self.aug, self.size
        # Drawn on the CPU, then ONE pinned non_blocking copy to the cache's device: no host sync per batch.
        p = augment_mod.params_to(augment_mod.sample_params(gen, n, h, w, aug), self.cache.device)
        if self.cv_crop is not None:  # crop + resize + flips only, OpenCV: uint8 resize + LUT normalize
            return self.cv_crop(idx, p, out)
        if self.kernel == "separable":
            # crop + resize + flips only: two separable 1-D lerp passes straight from the uint8
            # cache (several times cheaper than index_select + float copy + grid_sample on CPU).
            a, b = augment_mod.normalize_coefficients(out.device)
            return augment_mod.crop_flip_separable(self.cache, idx, p, s, out, a, b)
        src_u8 = torch.index_select(self.cache, 0, idx, out=self._buf("u8", (n, 3, h, w), torch.uint8))
        src = self._buf("src", (n, 3, h, w), self.work_dtype).copy_(src_u8)  # N,3,H,W
        grid = self._buf("grid", (n, s, s, 2), self.work_dtype)
        x = augment_mod.warp_batch(src, p, s, aug.rotation, grid_out=grid)  # N,3,S,S in [0, 255]
        # In-place same-dtype ops, then one cast into `out`: several times faster on CPU than one
        # mixed-dtype op writing bf16 (measured).
        if not aug.has_jitter:
            a, b = augment_mod.normalize_coefficients(x.device, x.dtype)
            return out.copy_(x.mul_(a).add_(b))
        m, t = augment_mod.colour_affine(p, None, n, x.device)
        y = augment_mod.apply_colour(x, m, t, clamp=True, out=self._buf("colour", tuple(x.shape), x.dtype))
        return out.copy_(y)

    def __call__(self, epoch: int, k: int, indices: np.ndarray,
                 slot: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(indices).to(self.cache.device, non_blocking=True)
        if slot is not None:  # the sampler hands out slots only when there is a ring (train batches)
            # A ring slot: shared pages already mapped and faulted in. A fresh shared batch costs
            # more to create + first-touch (~30 ms for 38 MB) than the OpenCV kernel costs to fill it.
            out = self.ring[slot, :len(indices)]
        else:
            out = torch.empty((len(indices), 3, self.size, self.size), dtype=self.out_dtype,
                              device=self.cache.device, memory_format=self.memory_format)
            if self.share_output:  # written straight into shared memory: no copy when handed over
                out.share_memory_()
        with torch.no_grad():
            if self.augment:
                gen = torch.Generator()  # CPU draws: the same values on every device (augment.params_to)
                gen.manual_seed(mix_seed(self.seed, epoch, self.rank, k, 0xA06))
                images = self.train_batch(idx, gen, out)
            else:
                images = self.eval_batch(idx, out)
        return images, self.labels.index_select(0, idx)


PREFETCH = 2  # DataLoader prefetch_factor: batches dispatched ahead per worker
RING_SPARE = 6  # ring slots beyond those in flight: a recycled batch outlives 5 further reads
# (the trainer holds 1; engine.prefetch.ThreadPrefetcher up to 3 more)


def _init_worker(worker_id: int) -> None:
    tune_worker_malloc(worker_id)
    crop_cv.single_thread()


class _BatchDataset(Dataset):
    """Items are whole batches (epoch, k, indices): a worker builds a batch with batched ops."""

    def __init__(self, maker: BatchMaker):
        self.maker = maker

    def __len__(self) -> int:  # pragma: no cover - the sampler drives iteration
        return 0

    def __getitem__(self, item: tuple[int, int, np.ndarray, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.maker(*item)


class _BatchSampler:
    """(epoch, k, indices, ring slot): slots go round in dispatch order, across epochs."""

    def __init__(self, loader: ResidentLoader):
        # A weak reference: loader -> DataLoader -> sampler -> loader would be a cycle, and a loader
        # dropped without close() would then wait for the cycle collector, whose finalizer order lets
        # the DataLoader iterator stop the workers first: ~5 s per worker (Loader.__del__ takes 0.02 s).
        self.loader = weakref.proxy(loader)

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, int | None]]:
        ld = self.loader
        for k, b in enumerate(ld.plan().batches()):
            slot = None
            if ld.ring_slots:
                slot, ld.dispatched = ld.dispatched % ld.ring_slots, ld.dispatched + 1
            yield ld.epoch, k, b, slot

    def __len__(self) -> int:
        return len(self.loader)


class ResidentLoader(Loader):
    """On a GPU batches are built in this process (kernels run asynchronously anyway). On CPU they
    are built by `workers` forked processes, one whole batch each with one thread: the cache is
    shared copy-on-write, and batch-level parallelism keeps both cores busy without the per-op
    thread barriers of intra-op parallelism (which collapse when other processes load the cores),
    while the consumer's step overlaps the next batches."""

    kind = "resident"

    def __init__(self, pack: Pack, split: str, cfg: LoaderConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1, workers: int = 1, verify: bool = True):
        super().__init__(pack, split, cfg, device, rank, world_size)
        if len(pack.classes) == 0:
            raise PackError(f"{pack.path}: the pack lists no classes")
        need = cache_bytes(pack, split, cfg.size)
        if cfg.memory_budget_gb > 0 and need > memory_budget(cfg, self.device):
            raise ConfigError(f"resident loader: the {split} cache needs {need / (1 << 30):.2f} GB, over "
                              f"memory_budget_gb={cfg.memory_budget_gb}; raise the budget or use --loader dali/torch")
        self.cache = load_or_build_cache(pack, split, self.size, self.device, cfg, workers, verify)
        self.cache_hw = tuple(self.cache.shape[2:])
        self.augment = self.train and self.aug.preset != AugPreset.NONE
        cpu = self.device.type == "cpu"
        pooled = cpu and workers > 1
        # fp32 on CPU (grid_sample / matmul have no fast bf16 CPU kernels). fp16 on GPUs for bf16/fp16
        # output: the sampling grid shares the image dtype, and bf16's 8-bit mantissa would put
        # samples ~1 px off; fp16 keeps them within ~0.15 px at 300 px.
        work = torch.float32 if cpu or self.dtype == torch.float32 else torch.float16
        # Ring of shared train outputs (cfg.recycle_batches): the DataLoader dispatches at most
        # workers * PREFETCH batches beyond the last one it yielded, so slot g % R is rewritten only
        # after the consumer has read RING_SPARE - 1 batches past batch g.
        self.ring_slots = workers * PREFETCH + RING_SPARE if pooled and self.augment and cfg.recycle_batches else 0
        self.dispatched = 0
        ring = None
        if self.ring_slots:
            shape = (self.ring_slots, self.batch_size, 3, self.size, self.size)
            if self.memory_format == torch.channels_last:  # slots laid out R,N,S,S,3, viewed R,N,3,S,S
                r, n, c, s, _ = shape
                ring = torch.empty((r, n, s, s, c), dtype=self.dtype).share_memory_().permute(0, 1, 4, 2, 3)
            else:
                ring = torch.empty(shape, dtype=self.dtype).share_memory_()
        self.maker = BatchMaker(self.cache, torch.from_numpy(self.labels).to(self.device), self.size, self.aug,
                                self.augment, cfg.seed, rank, work, self.dtype, share_output=pooled, ring=ring,
                                memory_format=self.memory_format)
        self.cache = self.maker.cache  # interleaved for the OpenCV kernel: the planar copy is freed
        self._dl: DataLoader | None = None
        if pooled:

            self._dl = DataLoader(_BatchDataset(self.maker), sampler=_BatchSampler(self), batch_size=None,
                                  num_workers=workers, persistent_workers=True, prefetch_factor=PREFETCH,
                                  worker_init_fn=_init_worker,
                                  multiprocessing_context=mp.get_context(worker_context()))

    @property
    def train_kernel(self) -> str:
        """How train batches are built ("opencv", "separable", "grid-sample"; "none" for eval)."""
        return self.maker.kernel

    def batches(self) -> Iterator[Batch]:
        if self._dl is not None:
            for images, labels in self._dl:
                yield self.finish(images), labels
            return
        yield from StreamPrefetcher(self._in_process, self.device)  # GPU: batch k+1 built while step k runs

    def _in_process(self) -> Iterator[Batch]:
        for k, b in enumerate(self.plan().batches()):
            images, labels = self.maker(self.epoch, k, b)
            yield self.finish(images), labels

    def close(self) -> None:
        if self._dl is not None:
            shutdown_workers(self._dl)
            self._dl = None
        self.cache = torch.empty(0, dtype=torch.uint8)
