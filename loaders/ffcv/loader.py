"""`ffcv`: FFCV over the pack's `.beton` export, with the same contract as every other kind.

FFCV does what it is built for -- JPEG decode fused with the random resized crop
(`RandomResizedCropRGBImageDecoder`, torchvision's crop sampling) and `RandomHorizontalFlip`,
compiled by numba into one multi-threaded pass; eval uses `CenterCropRGBImageDecoder` with ratio
1 (the square of the shorter side, resized to S == resize shorter side to S + center crop S).

On a CPU the rest of the batch is built inside FFCV's compiled pipeline too, by two numba ops
FFCV lacks (loaders/ffcv/ops.py): a vertical flip, and NHWC uint8 -> NCHW normalized output dtype
through a lookup table (FFCV's NormalizeImage, writing NCHW). The timed FFCV is then FFCV at its
best, not FFCV plus torch glue. On CUDA, uint8 crosses to the GPU (FFCV's ToDevice, on its own
streams) and the vertical flip and normalization run there as batched tensor ops.

Rotation and colour jitter (not in FFCV) always run on the device on the whole batch, with the
maths of loaders/kinds/augment.py so the augmentation config means the same as in every loader:
rotation as one grid_sample over the S x S crop (flips and rotation commute in distribution: the
angle is uniform over the whole circle), jitter + normalization as one per-sample 3x3 colour map.

Order: the epoch plan of loaders/kinds/base.py (seeded permutation, DDP strided shares; eval storage
order in contiguous shares) is handed to FFCV as its traversal order, so FFCV reads exactly the
samples and order the other kinds read. FFCV's crop/flip draws come from numba's unseeded
per-thread generators: the order and the device-side draws are deterministic per (seed, epoch),
FFCV's crop boxes and flips are not.

numba compiles the pipeline on the first iteration (10-30 s on 2 cores); later epochs reuse it.
FFCV sets torch's thread count to `workers` (Compiler.set_num_threads) when a loader is built
and each time an epoch starts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from hamengine.config import AugPreset, LoaderConfig
from hamengine.loaders.ffcv.export import beton_for, require_ffcv
from hamengine.loaders.kinds import augment
from hamengine.loaders.kinds.base import Batch, Loader, mix_seed
from hamengine.loaders.pack.records import Pack

# numba (0.6x) raises KeyError inside the finalizer of a dispatcher compiled with Literal
# arguments -- FFCV's JPEG decode is one -- printing "Exception ignored ..." tracebacks whenever
# an FFCV pipeline is garbage-collected. Closed loaders park their compiled pipeline here instead
# (a few compiled functions each; a process builds a handful of loaders).
_COMPILED_PIPELINES: list[object] = []


def ffcv_params(gen: torch.Generator, n: int, size: int, aug, fused: bool) -> augment.AugParams:
    """Rotation / vflip / jitter draws of one batch, on the generator's device (the loader passes
    a CPU one): the crop box is the whole S x S output (FFCV cropped), hflip is off (FFCV flipped),
    and so is vflip when the pipeline flipped."""
    p = augment.sample_params(gen, n, size, size, aug)
    box = torch.tensor([0.0, 0.0, size, size]).expand(n, 4)
    vflip = torch.zeros_like(p.vflip) if fused else p.vflip
    return dataclasses.replace(p, box=box, hflip=torch.zeros_like(p.hflip), vflip=vflip)


class _PlanOrder:
    """FFCV TraversalOrder stand-in: sample ids of an epoch = this loader's epoch plan."""

    def __init__(self, owner: FFCVLoader):
        self.owner = owner

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.owner.plan(epoch).indices.astype(np.uint64)


class FFCVLoader(Loader):
    kind = "ffcv"

    def __init__(self, pack: Pack, split: str, cfg: LoaderConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1, workers: int = 1, verify: bool = True,
                 batches_ahead: int = 3):
        super().__init__(pack, split, cfg, device, rank, world_size)
        require_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader as FfcvLoader
        from ffcv.loader import OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor

        self.beton = beton_for(pack, split, verify=verify)
        self.augment = self.train and self.aug.preset != AugPreset.NONE
        # CPU: build the whole batch in FFCV's numba pipeline (see module doc); CUDA: uint8 to the GPU.
        self.fused = self.device.type == "cpu"
        # Rotation / jitter need float pixels on the device; otherwise the pipeline normalizes.
        self.device_aug = self.augment and (self.aug.rotation or self.aug.has_jitter)
        s = self.size
        if self.augment:
            image_ops = [RandomResizedCropRGBImageDecoder((s, s), scale=tuple(self.aug.scale),
                                                          ratio=tuple(self.aug.ratio))]
            if self.aug.hflip:
                image_ops.append(RandomHorizontalFlip(0.5))
        else:
            # Center square of the shorter side, resized to S (OpenCV INTER_AREA). Against
            # torchvision's resize-then-crop the crop lands up to ~1 px apart (integer offsets
            # before vs after scaling): 256 -> 224 agrees within 0.025 (normalized units) with
            # the other kinds; some small odd scales (72 -> 64) differ by ~0.04.
            image_ops = [CenterCropRGBImageDecoder((s, s), ratio=1.0)]
        label_ops = [IntDecoder(), ToTensor()]  # int64 [N, 1]
        if self.fused:
            from hamengine.loaders.ffcv.ops import (  # lazy: FFCV (an optional extra) only when its pipeline is built
                RandomVerticalFlip,
                ToNCHW,
                lookup_table,
            )

            if self.augment and self.aug.vflip:
                image_ops.append(RandomVerticalFlip())
            # float32 pixel values for the device-side warp / colour map, else the final values
            self.pipe_dtype = torch.float32 if self.device_aug else self.dtype
            image_ops += [ToNCHW(lookup_table(self.pipe_dtype, normalize=not self.device_aug)), ToTensor()]
        else:
            self.pipe_dtype = torch.uint8
            # uint8 [N, S, S, 3]; FFCV copies it to the GPU on its own streams, overlapping decode
            image_ops += [ToTensor(), ToDevice(self.device, non_blocking=True)]
            label_ops.append(ToDevice(self.device, non_blocking=True))
        plan0 = self.plan(0)
        self._ffcv = FfcvLoader(str(self.beton), batch_size=self.batch_size, num_workers=max(1, workers),
                                order=OrderOption.SEQUENTIAL, indices=plan0.indices.astype(np.uint64),
                                pipelines={"image": image_ops, "label": label_ops},
                                drop_last=self.train, batches_ahead=batches_ahead, os_cache=True)
        # Hand FFCV our epoch plan: its Random order (np.random per epoch, or DistributedSampler
        # when a process group exists) would read other samples than the other kinds for the same
        # (seed, epoch, rank) -- and needs torch.distributed even though rank/world_size are given.
        self._ffcv.traversal_order = _PlanOrder(self)
        self._ffcv.first_traversal_order = plan0.indices.astype(np.uint64)  # FFCV's len() reads it
        self._bufs: dict[str, torch.Tensor] = {}

    # -- after FFCV ---------------------------------------------------------------------------
    def _params(self, n: int, gen: torch.Generator) -> augment.AugParams:
        """ffcv_params drawn on the CPU, copied to the loader's device once."""
        return augment.params_to(ffcv_params(gen, n, self.size, self.aug, self.fused), self.device)

    def _buf(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A work buffer reused batch to batch: fresh ~100 MB tensors cost more in page faults than
        the arithmetic on them on a CPU (the resident loader measured the same)."""
        b = self._bufs.get(name)
        if b is None or tuple(b.shape) != shape or b.dtype != dtype:
            b = self._bufs[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return b

    def _device_aug(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x pixel values [N, 3, S, S] (float32 on CPU; uint8 on CUDA) -> rotated / flipped /
        jittered, normalized float [N, 3, S, S] in a new tensor of the output dtype."""
        n, s = x.shape[0], self.size
        p = self._params(n, gen)
        xf = x if x.is_floating_point() else x.to(self.dtype)
        if self.aug.rotation:  # rotation (+ vflip on CUDA) as one grid_sample
            xf = augment.warp_batch(xf, p, s, rotation=True, grid_out=self._buf("grid", (n, s, s, 2), xf.dtype))
        elif self.aug.vflip and not self.fused:
            xf = torch.where(p.vflip.view(n, 1, 1, 1), xf.flip(2), xf)
        out = torch.empty((n, 3, s, s), dtype=self.dtype, device=self.device, memory_format=self.memory_format)
        if self.aug.has_jitter:  # contrast pivots on mid-gray, as in every kind (mean_gray None)
            m, t = augment.colour_affine(p, None, n, self.device)
            return out.copy_(augment.apply_colour(xf, m, t, clamp=True))
        a, b = augment.normalize_coefficients(xf.device, xf.dtype)
        y = xf.mul_(a) if xf is not x else torch.mul(xf, a)  # never write into FFCV's buffer
        return out.copy_(y.add_(b))

    def _cuda_batch(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x uint8 [N, 3, S, S] on the GPU -> normalized cfg dtype."""
        if self.device_aug:
            return self._device_aug(x, gen)
        if self.augment and self.aug.vflip:
            flip = self._params(x.shape[0], gen).vflip.view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(2), x)
        return augment.normalize_u8(x, self.dtype, memory_format=self.memory_format)

    def _batch(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """FFCV's image output -> the contract's images. FFCV reuses its output buffers a few
        batches later: every path returns a new tensor."""
        if self.fused:
            x = images.view(self.pipe_dtype)  # [N, 3, S, S]; bf16 / fp16 come as their int16 bits
            if self.device_aug:
                return self._device_aug(x, gen)
            return x.clone(memory_format=self.memory_format)
        return self._cuda_batch(images.permute(0, 3, 1, 2), gen)  # NHWC uint8 viewed as NCHW

    # -- iteration ----------------------------------------------------------------------------
    def _sizes(self) -> list[int]:
        return self.plan().sizes

    def batches(self) -> Iterator[Batch]:
        sizes = self._sizes()
        if sum(sizes) == 0:  # an eval share with no samples (more ranks than samples)
            for _ in sizes:
                yield self._empty()
            return
        gen = torch.Generator()  # CPU: the draws do not depend on the device (augment.params_to)
        gen.manual_seed(mix_seed(self.cfg.seed, self.epoch, self.rank, 0xFFC7))
        self._ffcv.next_epoch = self.epoch  # read by _PlanOrder through FFCV's __iter__
        pending = list(sizes)
        epoch_iter = iter(self._ffcv)  # starts FFCV's producer thread
        try:
            yield from self._batches(epoch_iter, pending, gen)
        finally:
            # A consumer that stops early (break, exception) closes this generator: stop FFCV's
            # thread too, or it stays blocked on its full queue holding the batch buffers.
            epoch_iter.close()
            epoch_iter.join(timeout=1.0)  # it notices within 0.5 s; bounded in case it cannot

    def _batches(self, epoch_iter, pending: list[int], gen: torch.Generator) -> Iterator[Batch]:
        for images, labels in epoch_iter:
            with torch.no_grad():
                out = self.finish(self._batch(images, gen))
                y = labels.view(-1).to(torch.int64, copy=True)
            # Eval under DDP: a short rank splits its last batch in two (loaders/kinds/base.py) while
            # FFCV yields whole batches; re-cut to the plan's sizes.
            start = 0
            while start < out.shape[0]:
                k = pending.pop(0)
                yield out[start:start + k], y[start:start + k]
                start += k
        for _ in pending:  # only zero-size tail batches can remain
            yield self._empty()

    def _empty(self) -> Batch:
        s = self.size
        return (torch.empty(0, 3, s, s, dtype=self.dtype, device=self.device),
                torch.empty(0, dtype=torch.int64, device=self.device))

    def close(self) -> None:
        if self._ffcv is not None:
            _COMPILED_PIPELINES.append((self._ffcv.code, self._ffcv.graph))
        self._ffcv = None  # type: ignore[assignment]

    def __del__(self) -> None:
        ffcv_loader = getattr(self, "_ffcv", None)
        if ffcv_loader is not None:
            _COMPILED_PIPELINES.append((ffcv_loader.code, ffcv_loader.graph))
