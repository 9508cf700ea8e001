"""OpenCV crop-flip kernel: the resident loader's CPU train path when there is no rotation and no
colour jitter (`--aug crop-flip`), when OpenCV is installed. augment.crop_flip_separable is the
fallback and the reference.

Per sample and channel plane (the cache is uint8 [M, 3, H, W]):
  cv2.resize(plane[y0:y0+h, x0:x0+w] -> S x S, INTER_LINEAR)   SIMD fixed-point uint8 bilinear
  cv2.flip                                                        only where the sample flips
  cv2.LUT(uint8 -> out dtype) into out[i, c]                       normalize + cast in ONE pass
For a channels_last `out` (what the trainer feeds where channels_last measures faster) the three
resized planes are interleaved (cv2.merge, uint8: cheap), flipped once, and one 3-channel LUT writes
the interleaved output row: converting an NCHW batch to channels_last afterwards would cost a
second full pass over the float output in the consumer (measured: 0.19 -> 1.07 CPU ms/image at
224 px fp32, 5.8x slower, on a host whose plan is fp32 + channels_last).
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
    CPU batches of `out_dtype`, contiguous or channels_last. Holds the lookup tables and scratch.

    The cache may be planar (contiguous [M, 3, H, W]) or interleaved (channels_last strides, see
    interleaved()); both give the same bits."""

    def __init__(self, cache: torch.Tensor, size: int, out_dtype: torch.dtype,
                 scale: torch.Tensor, shift: torch.Tensor):
        if not available(out_dtype):
            raise ValueError(f"CropFlipCV: no OpenCV or no lookup table for {out_dtype}")
        self.hwc_cache = not cache.is_contiguous() and cache.is_contiguous(memory_format=torch.channels_last)
        if cache.device.type != "cpu" or cache.dtype != torch.uint8 or not (cache.is_contiguous() or self.hwc_cache):
            raise ValueError("CropFlipCV needs a uint8 CPU cache [M, 3, H, W], contiguous or channels_last")
        # The tensor, viewed as numpy per batch (no copy): pickled to a forkserver worker it travels
        # as shared memory, as torch tensors do, where a numpy view would be copied by value.
        self.cache = cache
        self.size = size
        levels = torch.arange(256, dtype=torch.float32)[None, :]  # 1,256
        values = levels * scale.reshape(-1, 1).float() + shift.reshape(-1, 1).float()  # 3,256 float32
        self.lut = np.ascontiguousarray(_numpy_view(values.to(out_dtype)))  # 3,256: rounded once, like a cast
        self.lut_hwc = np.ascontiguousarray(self.lut.T[None])  # 1,256,3: one 3-channel table
        self.planes = [np.empty((size, size), np.uint8) for _ in range(3)]
        self.flipped_plane = np.empty((size, size), np.uint8)
        self.hwc = np.empty((size, size, 3), np.uint8)
        self.flipped_hwc = np.empty((size, size, 3), np.uint8)

    def _resized_hwc(self, src: np.ndarray, box: list[int]) -> np.ndarray:
        """S,S,3 uint8: the box of one cached image resized (interleaved cache: one 3-channel resize;
        planar: three plane resizes interleaved by cv2.merge, uint8 and cheap)."""
        x0, y0, w, h = box
        s = self.size
        if self.hwc_cache:  # src: H,W,3
            return cv2.resize(src[y0:y0 + h, x0:x0 + w], (s, s), dst=self.hwc, interpolation=cv2.INTER_LINEAR)
        for c in range(3):  # src: 3,H,W
            cv2.resize(src[c, y0:y0 + h, x0:x0 + w], (s, s), dst=self.planes[c], interpolation=cv2.INTER_LINEAR)
        return cv2.merge(self.planes, dst=self.hwc)

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
        src = self.cache.permute(0, 2, 3, 1).numpy() if self.hwc_cache else self.cache.numpy()  # M,H,W,3 | M,3,H,W
        for i, (row, box) in enumerate(zip(rows, boxes, strict=True)):
            # cv2.flip codes: 1 mirrors left-right, 0 top-bottom, -1 both.
            code = (-1 if vflip[i] else 1) if hflip[i] else (0 if vflip[i] else None)
            if nhwc or self.hwc_cache:
                img = self._resized_hwc(src[row], box)  # S,S,3 uint8
                if code is not None:
                    img = cv2.flip(img, code, dst=self.flipped_hwc)
                if nhwc:  # one 3-channel LUT writes the interleaved output row
                    cv2.LUT(img, self.lut_hwc, dst=dst[i])
                    continue
                planes = cv2.split(img, self.planes)  # back to planes for an NCHW batch
                for c in range(3):
                    cv2.LUT(planes[c], self.lut[c], dst=dst[i, c])
                continue
            x0, y0, w, h = box
            for c in range(3):  # planar cache, NCHW output: plane by plane, no interleaving
                plane = cv2.resize(src[row][c, y0:y0 + h, x0:x0 + w], (s, s), dst=self.planes[c],
                                   interpolation=cv2.INTER_LINEAR)
                if code is not None:
                    plane = cv2.flip(plane, code, dst=self.flipped_plane)
                cv2.LUT(plane, self.lut[c], dst=dst[i, c])
        return out
