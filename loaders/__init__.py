"""hamengine.loaders: sources and synth (ingest), pack + records (the pack format), and the loaders
that turn a pack into normalized, augmented batches on the training device.

    from hamengine.loaders import build_loader
    loader = build_loader("PACK", "train", LoaderConfig(kind="resident"), "cuda")

Submodules import lazily: `import hamengine.loaders` does not load torch, DALI or pandas.
"""
from __future__ import annotations

from typing import Any

from hamengine.loaders.kinds.base import Loader

__all__ = ["build_loader", "Loader"]


def __getattr__(name: str) -> Any:
    if name == "build_loader":
        from hamengine.loaders.build import (
            build_loader,  # lazy: `import hamengine.loaders` stays light until a loader is built
        )

        return build_loader
    if name == "Loader":
        return Loader
    raise AttributeError(f"module 'hamengine.loaders' has no attribute {name!r}")
