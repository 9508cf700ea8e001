"""Named test points (placeholder until the full hook syntax lands): `fire(point, **ctx)` does
nothing unless HAMENGINE_HOOKS is set."""
from __future__ import annotations

import os


def fire(point: str, **ctx: object) -> None:
    if "HAMENGINE_HOOKS" not in os.environ:
        return
