"""Background-thread prefetch: the next batch is produced while the current step computes.

Loaders that already run ahead (DALI's pipeline queue, DataLoader workers) gain nothing; the
resident loader on CPU builds each batch in the calling thread, so without this the step waits
for its augmentation. The thread holds at most `depth` finished batches (bounded memory)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_END = object()


class ThreadPrefetcher:
    def __init__(self, iterable: Iterable[Any], depth: int = 2):
        self.iterable = iterable
        self.depth = depth

    def __iter__(self) -> Iterator[Any]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in self.iterable:
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_END)
            except BaseException as e:  # re-raised in the consumer, with its traceback
                q.put(e)

        thread = threading.Thread(target=produce, name="hamengine-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The consumer stopped early (max steps, interrupt, error): release the producer.
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
