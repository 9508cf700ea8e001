"""Two FFCV pipeline operations FFCV does not ship, written the way FFCV writes its own (numba,
parallel over the images of a batch), so on a CPU the whole batch is built inside FFCV's compiled
pipeline -- FFCV on its own ground:

- `RandomVerticalFlip`: FFCV's RandomHorizontalFlip, for rows (p = 1/2 per image).
- `ToNCHW`: uint8 [N, H, W, 3] -> [N, 3, H, W] through a per-channel 256-entry lookup table, like
  FFCV's NormalizeImage (CPU) but writing NCHW: transpose, normalization and dtype in one pass.
  The table holds the output dtype's bits (bf16 and fp16 as int16: numpy has no bf16; the torch
  side views them back), so the result needs no further conversion.

Import only when ffcv is installed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from hamengine.config import IMAGENET_MEAN, IMAGENET_STD


class RandomVerticalFlip(Operation):
    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()

        def vflip(images, dst):
            flip = np.random.rand(images.shape[0]) < 0.5
            for i in my_range(images.shape[0]):
                if flip[i]:
                    dst[i] = images[i, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        vflip.is_parallel = True
        return vflip

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


def lookup_table(dtype: torch.dtype, normalize: bool) -> np.ndarray:
    """[256, 3] table in the storage dtype: value v of channel c -> (v/255 - mean_c)/std_c (or just v
    as float when not normalizing), rounded once to `dtype`."""
    v = torch.arange(256, dtype=torch.float64)[:, None].expand(256, 3)
    if normalize:
        v = (v / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)) / torch.tensor(IMAGENET_STD,
                                                                                        dtype=torch.float64)
    t = v.to(dtype).contiguous()
    return (t.view(torch.int16) if t.element_size() == 2 else t).numpy().copy()


class ToNCHW(Operation):
    """uint8 NHWC -> NCHW via `table` ([256, 3], see lookup_table)."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = table

    def generate_code(self) -> Callable:
        table = self.table
        my_range = Compiler.get_iterator()

        def to_nchw(images, dst):
            n, h, w = images.shape[0], images.shape[1], images.shape[2]
            for i in my_range(n):
                for y in range(h):
                    for x in range(w):
                        dst[i, 0, y, x] = table[images[i, y, x, 0], 0]
                        dst[i, 1, y, x] = table[images[i, y, x, 1], 1]
                        dst[i, 2, y, x] = table[images[i, y, x, 2], 2]
            return dst[:n]

        to_nchw.is_parallel = True
        return to_nchw

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        h, w, c = previous_state.shape
        shape = (c, h, w)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=self.table.dtype),
                AllocationQuery(shape, self.table.dtype))


