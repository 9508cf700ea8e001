"""build_loader: one entry point for every loader kind, and the `auto` choice."""
from __future__ import annotations

from pathlib import Path

import torch

from hamengine.config import LoaderConfig, LoaderKind
from hamengine.errors import ConfigError
from hamengine.loaders.ffcv.loader import FFCVLoader
from hamengine.loaders.kinds.base import Loader
from hamengine.loaders.kinds.dali import DaliLoader, dali_available
from hamengine.loaders.kinds.folder import FolderLoader
from hamengine.loaders.kinds.resident import ResidentLoader, cache_bytes, memory_budget
from hamengine.loaders.kinds.torch_loader import TorchLoader
from hamengine.loaders.pack.records import Pack
from hamengine.runtime import cpu_count, resolve_device

# One class per kind, as FFCV's ORDER_MAP (`auto` is resolved to one of them by choose_kind). Every
# class takes (pack, split, cfg, device, rank, world_size, workers=, verify=) and fails in its
# constructor, before any worker starts, on what it cannot do (DALI missing, a resident cache over
# the memory budget, damaged shards when `verify`). Importing them costs no optional dependency:
# DALI and FFCV are imported when a loader of that kind is built.
LOADER_CLASSES: dict[LoaderKind, type[Loader]] = {
    LoaderKind.RESIDENT: ResidentLoader,
    LoaderKind.DALI: DaliLoader,
    LoaderKind.TORCH: TorchLoader,
    LoaderKind.FOLDER: FolderLoader,
    LoaderKind.FFCV: FFCVLoader,
}
assert set(LOADER_CLASSES) == set(LoaderKind) - {LoaderKind.AUTO}, "a LoaderKind without a class"


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
    return LOADER_CLASSES[kind](pack, split, cfg, dev, rank, world_size, workers=workers, verify=verify)
