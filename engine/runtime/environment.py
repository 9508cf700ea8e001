"""What this machine is: versions, devices, DALI capability; recorded in every run's env.json."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from hamengine.config import TrainConfig
from hamengine.engine.runtime.execution import resolve_execution
from hamengine.engine.runtime.hostplan import CACHE_FILE, cache_dir
from hamengine.runtime import cpu_count


def dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except Exception:  # ImportError, or a broken CUDA library load
        return None
    return dali.__version__


def _try_dali_pipeline(gpu: bool) -> bool:
    """Build and run a one-operator DALI pipeline; True when it works on this machine."""
    try:
        import numpy as np
        from nvidia.dali import fn, pipeline_def, types
    except Exception:
        return False
    try:
        @pipeline_def(batch_size=2, num_threads=1, device_id=0 if gpu else None,
                      prefetch_queue_depth=1)
        def probe():
            data = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)] * 2,
                                      batch=True, layout="HWC")
            if gpu:
                data = data.gpu()
            return fn.cast(data, dtype=types.FLOAT)

        pipe = probe()
        pipe.build()
        pipe.run()
        return True
    except Exception:
        return False


def git_commit(path: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hardware() -> dict[str, Any]:
    """Short hardware/version record for benchmark results and env.json."""
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus": cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali_version(),
        "commit": git_commit(Path(__file__).resolve().parent),
    }


def doctor_report() -> dict[str, Any]:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    dali = dali_version()
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali,
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "dali_cpu_pipeline": dali is not None and _try_dali_pipeline(gpu=False),
        "dali_gpu_pipeline": dali is not None and cuda and _try_dali_pipeline(gpu=True),
        "cpus": cpu_count(),
    }


def execution_plan(model: str = "hamnet", size: int = 128, batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    """What `train --model MODEL --size SIZE --batch-size B` would run here with every option on
    auto (resolve_execution, probe included): the record, its explanation and the cache file."""

    ex = resolve_execution(TrainConfig(model=model, size=size, batch_size=batch_size, device=device))
    return {**ex.record(), "lines": ex.explain(), "cache": str(cache_dir() / CACHE_FILE)}
