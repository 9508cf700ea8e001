"""`folder`: the per-file baseline most HAM10000 projects use -- a Dataset over the ORIGINAL download
(one JPEG file per image, PIL decode at full size, classic torchvision transforms per sample, a
DataLoader). It exists as the reference that `hamengine bench loader` compares every loader with.

The split's membership and order come from the pack (its keys for the split), so the baseline reads
exactly the images the other loaders read; the pixels come from cfg.source (the folder the pack was
built from). Transforms: RandomResizedCrop, flips, RandomRotation, ColorJitter, ToTensor, Normalize
(train); Resize + CenterCrop (eval). Each sample seeds torch's RNG from (seed, epoch, index).
"""
from __future__ import annotations

import io
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from hamengine.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig, AugPreset, LoaderConfig
from hamengine.errors import ConfigError
from hamengine.loaders.ingest.sources import load_source, read_image_bytes
from hamengine.loaders.kinds.base import Batch, Loader, shutdown_workers
from hamengine.loaders.kinds.torch_loader import _PlanSampler, worker_context
from hamengine.loaders.pack.records import Pack


def folder_transform(size: int, aug: AugConfig, train: bool) -> T.Compose:
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        return T.Compose([T.Resize(size), T.CenterCrop(size), *norm])
    steps: list = [T.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio)]
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(T.RandomVerticalFlip())
    if aug.rotation:
        steps.append(T.RandomRotation((0, 360)))
    if aug.has_jitter:
        steps.append(T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    return T.Compose([*steps, *norm])


class FolderDataset(Dataset):
    def __init__(self, refs: list[str], labels, transform: T.Compose):
        self.refs, self.labels, self.transform = refs, labels, transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:

        i, seed = item
        torch.manual_seed(seed)
        with Image.open(io.BytesIO(read_image_bytes(self.refs[i]))) as im:
            img = im.convert("RGB")
        return self.transform(img), int(self.labels[i])


def source_refs(pack: Pack, split: str, source: str) -> list[str]:
    """Image references in `source` for the pack's split, in the pack's storage order."""

    table = load_source(source, allow_missing=True)
    by_id = dict(zip(table.df["image_id"], table.df["image"], strict=True))
    keys = pack.keys(split)
    missing = [k for k in keys if k not in by_id]
    if missing:
        raise ConfigError(f"folder loader: {len(missing)} image(s) of the pack's {split} split are not in "
                          f"{source} (first: {', '.join(missing[:5])}); pass the folder the pack was built from")
    return [by_id[k] for k in keys]


class FolderLoader(Loader):
    kind = "folder"

    def __init__(self, pack: Pack, split: str, cfg: LoaderConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1, workers: int = 2, verify: bool = True):
        # `verify` is accepted for the uniform constructor (build.LOADER_CLASSES) and means nothing
        # here: the baseline reads the original images, not the pack's shards.
        super().__init__(pack, split, cfg, device, rank, world_size)
        if not cfg.source:
            raise ConfigError("loader 'folder' reads the original HAM10000 folder: set source (--source DIR)")
        augment = self.train and self.aug.preset != AugPreset.NONE
        ds = FolderDataset(source_refs(pack, split, cfg.source), self.labels,
                           folder_transform(self.size, self.aug, augment))
        kw: dict = {}
        if workers > 0:
            import multiprocessing

            kw = dict(num_workers=workers, persistent_workers=True, prefetch_factor=4,
                      multiprocessing_context=multiprocessing.get_context(worker_context()))
        self._dl = DataLoader(ds, batch_sampler=_PlanSampler(self), pin_memory=self.device.type == "cuda", **kw)

    def batches(self) -> Iterator[Batch]:
        for images, labels in self._dl:
            images = images.to(self.device, non_blocking=True)
            yield self.finish(images), labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        shutdown_workers(self._dl)
