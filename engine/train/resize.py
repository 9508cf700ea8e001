"""Progressive resizing: train batches grow from a small side to the target size over the epochs.

Small images early are cheap steps while the model learns coarse features; the last epochs run at
the target size, which validation and test always use. Sizes are multiples of 32 so only a few
distinct shapes exist (torch.compile recompiles per shape; FFCV's ImageNet recipe does the same).
Resizing happens on the device after the loader, so it works with every loader kind.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STEP = 32  # sizes are rounded down to a multiple of this


def size_for_epoch(epoch: int, epochs: int, min_size: int, size: int, end: float) -> int:
    """Train side for 0-based `epoch`: linear from min_size to size over [0, end * epochs), rounded
    down to a multiple of 32 (never below 32), then exactly `size`. min_size 0: always `size`."""
    ramp = end * epochs
    if min_size <= 0 or min_size >= size or epoch >= ramp:
        return size
    s = min_size + (size - min_size) * epoch / ramp
    return min(size, max(STEP, int(s) // STEP * STEP))


def resize_batch(images: torch.Tensor, side: int) -> torch.Tensor:
    """images N x C x H x W resized to side x side (bilinear, antialiased when shrinking), in the
    input's dtype and memory format. A batch already at `side` is returned as is."""
    if images.shape[-2:] == (side, side):
        return images
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous()
    # The antialiased bilinear kernel exists for float32/float64 only on some devices (CPU: no
    # bf16/fp16; CUDA: no uint8), so interpolate in float32 and cast back: one small extra copy.
    x = images if images.dtype == torch.float32 else images.float()
    out = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    if out.dtype != images.dtype:
        out = out.round().clamp(0, 255) if not images.dtype.is_floating_point else out
        out = out.to(images.dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=fmt)
