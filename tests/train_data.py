"""The training tests' pack, for modules that build it directly (the `train_pack` fixture in
conftest.py is the same build)."""
from __future__ import annotations

from builders import train_pack as small_pack

__all__ = ["small_pack"]
