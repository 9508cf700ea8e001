"""Where code runs: the device a command asks for and the CPUs this process may use.

Base layer (beside config.py and fileio.py): loaders, models, engine and bench all import it;
it imports nothing of theirs.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from hamengine.errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily: `hamengine --help` must not pay for it
    import torch  # lazy: torch (--help stays fast)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def resolve_device(pref: str | torch.device, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is present, else cpu; cpu, cuda, cuda:N as asked.
    Asking for CUDA where there is none is a ConfigError naming --device (every command uses this)."""
    import torch  # lazy: torch (--help stays fast)

    if isinstance(pref, torch.device):
        return pref
    text = (pref or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or re.fullmatch(r"cuda:\d+", text):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {pref} was asked for but CUDA is not available here; use "
                              f"--device cpu or auto")
        return torch.device("cuda", local_rank if text == "cuda" else int(text.split(":")[1]))
    raise ConfigError(f"--device {pref!r}: use auto, cpu, cuda or cuda:N")
