"""build_loader: one entry point for every loader kind, and the `auto` choice."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from hamengine.config import ConfigError, LoaderConfig, LoaderKind
from hamengine.loaders.kinds.base import Loader, verify_shards
from hamengine.loaders.pack.records import Pack
from hamengine.runtime import cpu_count, resolve_device


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_budget(cfg: LoaderConfig, device: torch.device) -> int:
    """Bytes the resident cache may take: cfg.memory_budget_gb, or half the free memory of the device."""
    if cfg.memory_budget_gb > 0:
        return int(cfg.memory_budget_gb * (1 << 30))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return _available_ram() // 2


def _probe_dali() -> None:
    """Import DALI and build + run a one-sample CPU pipeline: an installed wheel whose native
    library cannot load (wrong CUDA/glibc, broken install) fails here, not at the first batch."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def probe():
        return fn.cast(fn.external_source(source=lambda: np.zeros((2,), np.uint8), batch=False),
                       dtype=types.FLOAT)

    pipe = probe()
    pipe.build()
    pipe.run()


@functools.lru_cache(maxsize=1)
def dali_status() -> str:
    """'' when DALI imports and runs a pipeline, else why not (cached: probed once per process)."""
    try:
        _probe_dali()
    except Exception as e:  # ImportError, RuntimeError from the native library, anything: not usable
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {first}"
    return ""


def dali_available() -> bool:
    return dali_status() == ""


def choose_kind(pack: Pack, split: str, cfg: LoaderConfig, device: torch.device) -> LoaderKind:
    """`auto`: resident when the split's cache fits the budget, else dali when importable (and no
    class-balanced sampling is asked: DALI's reader cannot sample by weight), else torch."""
    try:
        kind = LoaderKind(cfg.kind)
    except ValueError:
        raise ConfigError(f"--loader {cfg.kind!r}: unknown loader kind; use one of "
                          f"{', '.join(k.value for k in LoaderKind)}") from None
    if kind != LoaderKind.AUTO:
        return kind
    from hamengine.loaders.kinds.resident import cache_bytes

    if cache_bytes(pack, split, cfg.size) <= memory_budget(cfg, device):
        return LoaderKind.RESIDENT
    if dali_available() and not (cfg.balance_sampler and split == "train"):
        return LoaderKind.DALI
    return LoaderKind.TORCH


def build_loader(pack: Pack | str | Path, split: str, cfg: LoaderConfig, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, verify: bool = True) -> Loader:
    """The loader for `split` of `pack` (see DESIGN.md, the loader contract).

    Everything that can be wrong with the pack fails here, before the first batch: missing or
    truncated shards (Pack), and -- with `verify` -- shard hashes (the resident loader hashes only
    when it builds its cache: a cache keyed by the manifest's fingerprint was built from a verified
    pack). `verify=False` skips hashing for very large packs."""
    if not isinstance(pack, Pack):
        pack = Pack(pack, check_files=True)
    else:
        pack.check_files()
    pack.num_samples(split)  # unknown split -> PackError naming the splits
    dev = resolve_device(device)
    kind = choose_kind(pack, split, cfg, dev)
    workers = cfg.workers if cfg.workers > 0 else cpu_count()
    if kind == LoaderKind.RESIDENT:
        from hamengine.loaders.kinds.resident import ResidentLoader, cache_bytes

        need = cache_bytes(pack, split, cfg.size)
        if cfg.memory_budget_gb > 0 and need > memory_budget(cfg, dev):
            raise ConfigError(f"resident loader: the {split} cache needs {need / (1 << 30):.2f} GB, over "
                              f"memory_budget_gb={cfg.memory_budget_gb}; raise the budget or use --loader dali/torch")
        return ResidentLoader(pack, split, cfg, dev, rank, world_size, workers=workers, verify=verify)
    if kind == LoaderKind.FOLDER:
        from hamengine.loaders.kinds.folder import FolderLoader

        return FolderLoader(pack, split, cfg, dev, rank, world_size, workers=workers)
    if kind == LoaderKind.FFCV:  # optional extra; checks its .beton against the pack itself
        from hamengine.loaders.ffcv.loader import FFCVLoader

        return FFCVLoader(pack, split, cfg, dev, rank, world_size, workers=workers, verify=verify)
    if verify:
        verify_shards(pack, split)
    if kind == LoaderKind.TORCH:
        from hamengine.loaders.kinds.torch_loader import TorchLoader

        return TorchLoader(pack, split, cfg, dev, rank, world_size, workers=workers)
    if kind == LoaderKind.DALI:
        if not dali_available():
            raise ConfigError(f"loader 'dali' needs a working NVIDIA DALI ({dali_status()}); install "
                              "nvidia-dali-cuda130 or use --loader resident/torch")
        from hamengine.loaders.kinds.dali import DaliLoader

        return DaliLoader(pack, split, cfg, dev, rank, world_size, workers=workers)
    raise ConfigError(f"unknown loader {kind.value!r} (kinds: auto, dali, resident, torch, folder, ffcv)")
