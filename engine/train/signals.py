"""Stopping a run cleanly: SIGINT/SIGTERM set a flag that the training loop checks at step
boundaries (so no step, checkpoint or metrics line is ever cut in half); a second signal aborts."""
from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """`with StopRequest() as stop: ... if stop(): ...`; `stop.signum` is the signal received."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
