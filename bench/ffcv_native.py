"""`ffcv-native` / `ffcv-native-jpg`: FFCV exactly as its users run it, the peer column of `bench loader`.

FFCV's own operators only, as in FFCV's ImageNet example (ffcv-imagenet `train_imagenet.py`):

    train: RandomResizedCropRGBImageDecoder((S, S)) -> RandomHorizontalFlip() ->
           NormalizeImage(mean, std, float16) -> ToTensor() -> ToTorchImage()      (CPU)
           ... ToTensor() -> ToDevice(cuda) -> ToTorchImage() -> NormalizeImage(fp16) (CUDA)
    eval:  CenterCropRGBImageDecoder((S, S), ratio=224/256) with the same tail

at its best settings: `os_cache=True`, workers = all cores, OrderOption.RANDOM for train
(QUASI_RANDOM is FFCV's choice for data larger than RAM; HAM10000 is not), SEQUENTIAL for eval. It implements
only what FFCV implements natively: no vertical flip, rotation or colour jitter (so it is timed
against `--aug crop-flip`), and the output is fp16 whatever --dtype says.

`ffcv-native` reads the raw export at S (PACK/ffcv-raw-S/: the resident cache's pixels, so both read
identical pixels and neither decodes a JPEG per epoch); `ffcv-native-jpg` the jpg export (the pack's
JPEG bytes). A missing export is written first, inside the loader's set-up time.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hamengine.config import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig
from hamengine.loaders.ffcv.export import beton_for
from hamengine.loaders.pack.records import Pack
from hamengine.runtime import cpu_count, resolve_device

NATIVE_KINDS = {"ffcv-native": "raw", "ffcv-native-jpg": "jpg"}


class FFCVNative:
    """FFCV's Loader with FFCV's pipeline; the bench's loader interface (iterate, set_epoch, close)."""

    def __init__(self, pack_dir: str, split: str, cfg: LoaderConfig, device: str, mode: str):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import (
            NormalizeImage,
            RandomHorizontalFlip,
            Squeeze,
            ToDevice,
            ToTensor,
            ToTorchImage,
        )


        pack = Pack(pack_dir)
        self.device = resolve_device(device)
        self.kind = f"ffcv-native{'-jpg' if mode == 'jpg' else ''}"
        s = cfg.size
        beton = beton_for(pack, split, mode=mode, size=s if mode == "raw" else None)
        train = split == "train"
        mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
        decode = (RandomResizedCropRGBImageDecoder((s, s), scale=tuple(cfg.aug.scale), ratio=tuple(cfg.aug.ratio))
                  if train else CenterCropRGBImageDecoder((s, s), ratio=224 / 256))
        image: list[Any] = [decode] + ([RandomHorizontalFlip()] if train else [])
        labels: list[Any] = [IntDecoder(), ToTensor(), Squeeze()]
        if self.device.type == "cuda":
            image += [ToTensor(), ToDevice(self.device, non_blocking=True), ToTorchImage(),
                      NormalizeImage(mean, std, np.float16)]
            labels.append(ToDevice(self.device, non_blocking=True))
        else:
            image += [NormalizeImage(mean, std, np.float16), ToTensor(), ToTorchImage()]
        self._ffcv = Loader(str(beton), batch_size=cfg.batch_size, num_workers=cfg.workers or cpu_count(),
                            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, os_cache=True,
                            drop_last=train, pipelines={"image": image, "label": labels}, seed=cfg.seed)
        self.num_samples = (len(self._ffcv) * cfg.batch_size if train else pack.num_samples(split))

    def set_epoch(self, epoch: int) -> None:  # FFCV reshuffles per epoch by itself
        pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._ffcv:
            yield images, labels  # fp16 [N, 3, S, S] channels_last view, int [N]

    def close(self) -> None:
        self._ffcv = None
