"""OpenCV crop-flip kernel: the resident loader's CPU train path when there is no rotation and no
colour jitter (`--aug crop-flip`), when OpenCV is installed. augment.crop_flip_separable is the
fallback and the reference.

The kernel keeps the cache interleaved (uint8 [M, 3, H, W] with channels_last strides: M,H,W,3 in
memory) and per sample:
  cv2.resize(img[y0:y0+h, x0:x0+w] -> S x S, INTER_LINEAR)   one 3-channel SIMD fixed-point bilinear
  cv2.flip                                                     only where the sample flips
  cv2.LUT(uint8 -> out dtype) into out[i]                      normalize + cast in ONE pass
writing the batch in the consumer's memory format: a channels_last `out` takes one 3-channel LUT per
sample; an NCHW `out` one LUT per plane after cv2.split. Converting an NCHW batch to channels_last
afterwards would cost a second full pass over the float output in the consumer (measured: 0.19 ->
1.07 CPU ms/image at 224 px fp32 on a host whose plan is fp32 + channels_last), and one 3-channel
resize costs 7.0 ms per batch of 128 at 224 px on one core against 10.6 ms for three plane resizes.
Why: the torch path widens every gathered row to float32, blends, blends again and casts (five
passes over float data per batch); OpenCV's uint8 resize is ~4x cheaper per image than that, and a
256-entry lookup table per channel holds x * a + b already rounded to the output dtype (bf16 as
its bit patterns), so normalizing costs one byte read + one 2-byte write per pixel, with the same
single rounding as computing in float32 and casting. Measured on one core, 128 crops of a
224 x 298 cache to 224: 64 ms/batch (torch separable) -> 24 ms (this), see BENCHMARKS.md.

Sample points: the same as warp_batch without rotation (align_corners=False, output pixel i reads
source x = x0 + (i + 0.5) * w / S - 0.5), except within half a pixel of the crop box's edge: OpenCV
clamps there to the box (torchvision's crop-then-resize), warp_batch to the whole image. Values
differ from the float path by OpenCV's fixed-point rounding (at most 1 of 255 levels).
"""
from __future__ import annotations

import numpy as np
import torch

from hamengine.loaders.kinds.augment import AugParams

try:  # optional: without OpenCV the resident loader uses augment.crop_flip_separable
    import cv2
except ImportError:  # pragma: no cover - CI installs OpenCV (via the ffcv extra)
    cv2 = None

# The output dtypes a lookup table can hold, with the numpy element type that carries their bits.
_LUT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def available(out_dtype: torch.dtype) -> bool:
    """True when this kernel can write `out_dtype` batches here."""
    return cv2 is not None and out_dtype in _LUT_TYPES


def single_thread() -> None:
    """In a loader worker: one OpenCV thread (the workers are the parallelism; OpenCV's own pool
    would oversubscribe the cores, as intra-op torch threads would)."""
    if cv2 is not None:
        cv2.setNumThreads(1)


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """t's memory as numpy (bf16 as uint16 bit patterns), no copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def interleaved(cache: torch.Tensor) -> torch.Tensor:
    """The cache [M, 3, H, W] with its pixels interleaved (channels_last strides: memory M,H,W,3),
    the layout CropFlipCV resizes fastest (one 3-channel cv2.resize per sample: 7.0 ms per batch of
    128 at 224 px on one core, against 10.6 ms for three plane resizes). A copy: the caller drops the
    planar cache."""
    return cache.contiguous(memory_format=torch.channels_last)


class CropFlipCV:
    """Writes crop + resize + flips + normalize (x * scale + shift, per channel) of cache rows into
    CPU batches of `out_dtype`, contiguous or channels_last. Holds the interleaved cache (`cache`:
    the caller should keep this one and drop a planar original), the lookup tables and scratch."""

    def __init__(self, cache: torch.Tensor, size: int, out_dtype: torch.dtype,
                 scale: torch.Tensor, shift: torch.Tensor):
        if not available(out_dtype):
            raise ValueError(f"CropFlipCV: no OpenCV or no lookup table for {out_dtype}")
        if cache.device.type != "cpu" or cache.dtype != torch.uint8 or cache.dim() != 4:
            raise ValueError("CropFlipCV needs a uint8 CPU cache [M, 3, H, W]")
        # The tensor, viewed as numpy per batch (no copy): pickled to a forkserver worker it travels
        # as shared memory, as torch tensors do, where a numpy view would be copied by value.
        self.cache = interleaved(cache)  # no copy when it already is
        self.size = size
        levels = torch.arange(256, dtype=torch.float32)[None, :]  # 1,256
        values = levels * scale.reshape(-1, 1).float() + shift.reshape(-1, 1).float()  # 3,256 float32
        self.lut = np.ascontiguousarray(_numpy_view(values.to(out_dtype)))  # 3,256: rounded once, like a cast
        self.lut_hwc = np.ascontiguousarray(self.lut.T[None])  # 1,256,3: one 3-channel table
        self.planes = [np.empty((size, size), np.uint8) for _ in range(3)]
        self.hwc = np.empty((size, size, 3), np.uint8)
        self.flipped = np.empty((size, size, 3), np.uint8)

    def __call__(self, idx: torch.Tensor, p: AugParams, out: torch.Tensor) -> torch.Tensor:
        """out: [N, 3, S, S] on the CPU, contiguous or channels_last, N = len(idx); returns out."""
        s = self.size
        nhwc = not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
        if out.device.type != "cpu" or not (nhwc or out.is_contiguous()) or tuple(out.shape[1:]) != (3, s, s):
            raise ValueError(f"CropFlipCV writes contiguous or channels_last CPU [N, 3, {s}, {s}] batches, "
                             f"got {tuple(out.shape)} with strides {out.stride()}")
        dst = _numpy_view(out.permute(0, 2, 3, 1) if nhwc else out)  # N,S,S,3 or N,3,S,S: contiguous
        boxes = p.box.round().to(torch.int64).tolist()  # integer-valued already (sample_crop_boxes)
        rows, hflip, vflip = idx.tolist(), p.hflip.tolist(), p.vflip.tolist()
        src = self.cache.permute(0, 2, 3, 1).numpy()  # M,H,W,3
        for i, (row, (x0, y0, w, h)) in enumerate(zip(rows, boxes, strict=True)):
            img = cv2.resize(src[row, y0:y0 + h, x0:x0 + w], (s, s), dst=self.hwc, interpolation=cv2.INTER_LINEAR)
            # cv2.flip codes: 1 mirrors left-right, 0 top-bottom, -1 both.
            code = (-1 if vflip[i] else 1) if hflip[i] else (0 if vflip[i] else None)
            if code is not None:
                img = cv2.flip(img, code, dst=self.flipped)
            if nhwc:  # one 3-channel LUT writes the interleaved output row
                cv2.LUT(img, self.lut_hwc, dst=dst[i])
                continue
            for c, plane in enumerate(cv2.split(img, self.planes)):  # NCHW: plane by plane
                cv2.LUT(plane, self.lut[c], dst=dst[i, c])
        return out
