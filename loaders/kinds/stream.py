"""Side-stream prefetch for loaders that build batches on the GPU in the calling process (resident).

Batch k+1's kernels are enqueued on a side CUDA stream *before* batch k is handed to the step, so
the GPU overlaps augmentation with the step's forward/backward (DeepLearningExamples'
`PrefetchedWrapper`, FFCV's ring of events). Ordering without host syncs:

  side stream:  build k ─ record(ev_k) ─ build k+1 ─ record(ev_k+1) ...
  main stream:            wait(ev_k) ─ step k ───── wait(ev_k+1) ─ step k+1 ...

`wait_event` is a GPU-side wait (the host never blocks), and `record_stream` tells the caching
allocator that the batch's memory, allocated on the side stream, is in use on the main stream until
step k's kernels finish, so it is not handed to batch k+2 too early. On a CPU device the wrapper
yields the same items unchanged (same batches, same order).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch


def _tensors(item: Any) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, (tuple, list)):
        return [t for x in item for t in _tensors(x)]
    return []


class StreamPrefetcher:
    """Iterate `make()`'s items one ahead, built on a side stream of a CUDA `device` (on CPU: same items,
    one ahead, no streams)."""

    def __init__(self, make: Callable[[], Iterable[Any]], device: torch.device):
        self.make, self.device = make, torch.device(device)

    def __iter__(self) -> Iterator[Any]:
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if side is not None:  # work queued so far on the main stream (the cache upload) comes first
            side.wait_stream(torch.cuda.current_stream(self.device))
        it = iter(self.make())

        def fetch() -> tuple[Any, Any] | None:
            with torch.cuda.stream(side) if side is not None else nullcontext():
                try:
                    item = next(it)
                except StopIteration:
                    return None
                event = None
                if side is not None:
                    event = torch.cuda.Event()
                    event.record(side)
            return item, event

        nxt = fetch()
        while nxt is not None:
            item, event = nxt
            if event is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(event)  # GPU-side: the step's kernels start after the batch is built
                for t in _tensors(item):
                    if t.is_cuda:
                        t.record_stream(main)
            nxt = fetch()  # batch k+1 is enqueued before step k runs
            yield item
