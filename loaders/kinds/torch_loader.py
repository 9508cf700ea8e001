"""`torch`: the portable fallback -- torch DataLoader over the pack's random access (global shuffle).

Workers decode with torchvision.io.decode_jpeg and do the per-sample geometry with
torchvision.transforms.v2 (resized crop, rotation, flips) on uint8, from parameters drawn by
augment.sample_params with a per-sample seed (seed, epoch, index): batches do not depend on which
worker ran what. The uint8 batch goes to the device (pinned + non_blocking with CUDA); colour jitter
and normalization then run batched there (augment.colour_affine: one 3x3 matmul), which is both
cheaper than per-sample ColorJitter and the same maths the resident loader uses.

Workers are persistent; they are started with `forkserver` when CUDA is initialized or DALI is
loaded in this process (forking a CUDA context or DALI's threads breaks the children), else `fork`.
"""
from __future__ import annotations

import multiprocessing
import sys
import weakref
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from hamengine.config import AugConfig, AugPreset, LoaderConfig
from hamengine.loaders.kinds import augment
from hamengine.loaders.kinds.base import (
    Batch,
    Loader,
    mix_seed,
    shutdown_workers,
    tune_worker_malloc,
    verify_shards,
)
from hamengine.loaders.pack.records import Pack

Item = tuple[int, int]  # (split index, per-sample seed)


def eval_transform(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, h, w] -> [3, S, S]: shorter side to S (antialiased), center crop."""
    return TF.center_crop(TF.resize(img, [size], antialias=True), [size, size])


def train_geometry(img: torch.Tensor, size: int, aug: AugConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: (uint8 [3, S, S] cropped/rotated/flipped, float[4] colour factors b, c, s, h)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = img.shape[1:]
    p = augment.sample_params(gen, 1, h, w, aug)
    r = p.row(0)
    out = TF.resized_crop(img, r["y0"], r["x0"], r["h"], r["w"], [size, size], antialias=True)
    if aug.rotation:
        out = TF.rotate(out, r["angle_deg"], interpolation=InterpolationMode.BILINEAR, fill=0)
    if r["hflip"]:
        out = TF.horizontal_flip(out)
    if r["vflip"]:
        out = TF.vertical_flip(out)
    colour = torch.stack((p.brightness, p.contrast, p.saturation, p.hue), 1)[0]
    return out, colour


class PackDataset(Dataset):
    """Random access into one split; items are (index, seed) pairs from the loader's batch sampler."""

    def __init__(self, pack: Pack, split: str, size: int, aug: AugConfig, augment_train: bool):
        self.pack, self.split, self.size, self.aug, self.augment = pack, split, size, aug, augment_train
        self.labels = pack.labels(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, int, torch.Tensor]:
        i, seed = item
        buf = torch.frombuffer(bytearray(self.pack.jpeg(self.split, i)), dtype=torch.uint8)
        img = decode_jpeg(buf, mode=ImageReadMode.RGB)
        if self.augment:
            out, colour = train_geometry(img, self.size, self.aug, seed)
        else:
            out, colour = eval_transform(img, self.size), torch.ones(4)
        return out, int(self.labels[i]), colour


class _PlanSampler:
    """Batch sampler following the loader's epoch plan; runs in the main process, so set_epoch is
    seen by persistent workers too."""

    def __init__(self, loader: Loader):
        # A weak reference: loader -> DataLoader -> sampler -> loader would be a cycle, and a loader
        # dropped without close() would then wait for the cycle collector, whose finalizer order lets
        # the DataLoader iterator stop the workers first: ~5 s per worker (Loader.__del__ takes 0.02 s).
        self.loader = weakref.proxy(loader)

    def __iter__(self) -> Iterator[list[Item]]:
        ld = self.loader
        for b in ld.plan().batches():
            yield [(int(i), mix_seed(ld.cfg.seed, ld.epoch, int(i), 0x70C)) for i in b]

    def __len__(self) -> int:
        return len(self.loader)


def worker_context() -> str:
    # DALI creates its own CUDA context (torch.cuda.is_initialized() does not see it); CPU-only DALI
    # pipelines fork safely, and forkserver costs seconds of re-imports per worker.
    if not torch.cuda.is_available():
        return "fork"
    return "forkserver" if torch.cuda.is_initialized() or "nvidia.dali" in sys.modules else "fork"


def colour_batch(imgs: torch.Tensor, colour: torch.Tensor, jitter: bool, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, 3, S, S] + colour factors [N, 4] -> jittered (when `jitter`), normalized `dtype`."""
    if not jitter:
        return augment.normalize_u8(imgs, dtype)
    n = imgs.shape[0]
    work = torch.float32 if imgs.device.type == "cpu" else dtype
    p = augment.AugParams(box=torch.empty(0), angle=torch.empty(0), hflip=torch.empty(0),
                          vflip=torch.empty(0), brightness=colour[:, 0], contrast=colour[:, 1],
                          saturation=colour[:, 2], hue=colour[:, 3])
    m, t = augment.colour_affine(p, None, n, imgs.device)
    return augment.apply_colour(imgs.to(work), m, t, clamp=True).to(dtype)


class CpuCollate:
    """Collate in the worker for CPU training: stack, colour + normalize + cast there, so the main
    process (the training step) gets finished batches. With CUDA the uint8 batch is sent instead
    (half the bytes of bf16) and coloured on the GPU."""

    def __init__(self, jitter: bool, dtype: torch.dtype):
        self.jitter, self.dtype = jitter, dtype

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        imgs = torch.stack([it[0] for it in items])
        labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
        colour = torch.stack([it[2] for it in items])
        with torch.no_grad():
            return colour_batch(imgs, colour, self.jitter, self.dtype), labels, colour


class TorchLoader(Loader):
    kind = "torch"

    def __init__(self, pack: Pack, split: str, cfg: LoaderConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1, workers: int = 2, verify: bool = True):
        super().__init__(pack, split, cfg, device, rank, world_size)
        if verify:
            verify_shards(pack, split)
        self.augment = self.train and self.aug.preset != AugPreset.NONE
        self.jitter = self.augment and self.aug.has_jitter
        self.dataset = PackDataset(pack, split, self.size, self.aug, self.augment)
        cuda = self.device.type == "cuda"
        kw: dict = {}
        if workers > 0:
            kw = dict(num_workers=workers, persistent_workers=True, prefetch_factor=4,
                      worker_init_fn=tune_worker_malloc,
                      multiprocessing_context=multiprocessing.get_context(worker_context()))
            if not cuda:
                kw["collate_fn"] = CpuCollate(self.jitter, self.dtype)
        self._dl = DataLoader(self.dataset, batch_sampler=_PlanSampler(self), pin_memory=cuda, **kw)

    def batches(self) -> Iterator[Batch]:
        for imgs, labels, colour in self._dl:
            if imgs.dtype == torch.uint8:  # coloured here: on the GPU, or without workers
                x = imgs.to(self.device, non_blocking=True)
                with torch.no_grad():
                    imgs = colour_batch(x, colour.to(self.device, non_blocking=True), self.jitter, self.dtype)
            yield self.finish(imgs), labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        shutdown_workers(self._dl)


__all__ = ["TorchLoader", "PackDataset", "eval_transform", "train_geometry"]
