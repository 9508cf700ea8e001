"""The one reader of hamengine packs (format v1): every loader goes through `Pack`.

A pack is a folder: `manifest.json` (written last: its presence marks a complete pack), tar shards
`<split>-NNNNNN.tar` holding samples `<image_id>.cls/.jpg/.json`, and DALI's `<shard>.idx` beside
each shard. Exports made later from the pack (FFCV's `.beton` files) are recorded under the
manifest's `exports` key; the pack's fingerprint covers everything else, so adding an export does
not change it. Random access reads the index once per split and slices an mmap of the shard: no tar
scan, no copy until `bytes(...)`.
"""
from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hamengine.errors import UserError
from hamengine.loaders.ingest.metadata import MetaSchema, fit_schema
from hamengine.loaders.pack.tario import TarIndexError, index_path_for, read_index

if TYPE_CHECKING:
    from hamengine.loaders.ingest.metadata import MetaSchema

FORMAT = "hamengine-pack"
VERSION = 1
MANIFEST = "manifest.json"
COMPONENTS = ("cls", "jpg", "json")  # written in this order per sample
EXPORTS = "exports"  # manifest key for derived formats; outside the fingerprint


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as `hamengine pack` writes it (the fingerprint is defined over these bytes)."""
    return (json.dumps(manifest, indent=2) + "\n").encode()


def fingerprint(manifest: dict[str, Any], raw: bytes | None = None) -> str:
    """sha256 of the manifest as the pack wrote it, i.e. without `exports` (`raw`: the file's bytes,
    used as they are when there is no export to leave out)."""
    if raw is not None and EXPORTS not in manifest:
        return hashlib.sha256(raw).hexdigest()
    return hashlib.sha256(manifest_bytes({k: v for k, v in manifest.items() if k != EXPORTS})).hexdigest()


class PackError(UserError):
    """A pack that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Shard:
    name: str
    split: str
    path: Path
    idx_path: Path
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Sample:
    key: str  # image_id
    jpeg: bytes
    label: int  # index into Pack.classes
    meta: dict[str, Any]  # the .json component


@dataclass
class _SplitIndex:
    """Where every sample of a split lives. Arrays, not objects: cheap to pickle into workers."""

    keys: list[str]
    shard: np.ndarray  # int32[N]: position in Pack.shards(split)
    offsets: np.ndarray  # int64[N, 3]: data offset of cls, jpg, json
    sizes: np.ndarray  # int64[N, 3]


def _fix_hint() -> str:
    return "re-run `hamengine pack` (same command) to rebuild it, or `hamengine verify` to find the damage"


class Pack:
    """Open and validate a pack. `check_files` checks every shard and index exists with the
    manifest's size (hashes are `hamengine verify`'s job: too slow for every open)."""

    def __init__(self, path: str | Path, check_files: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if self.path.is_file():
            raise PackError(f"{self.path} is a file, not a pack folder: give the folder `hamengine pack "
                            f"--out` wrote (the one holding {MANIFEST})")
        if not self.path.is_dir():
            raise PackError(f"{self.path}: no such pack folder; create one with `hamengine pack`")
        try:
            raw = mpath.read_bytes()
        except FileNotFoundError:
            hint = (" (an interrupted `hamengine pack` left it: run the same command again)"
                    if (self.path / ".pack-in-progress").exists() else "")
            raise PackError(f"{self.path}: not a complete pack: {MANIFEST} is missing{hint}") from None
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            raise PackError(f"{mpath}: not valid JSON ({e}); {_fix_hint()}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PackError(f"{mpath}: not a hamengine pack manifest (format != {FORMAT!r})")
        if manifest.get("version") != VERSION:
            raise PackError(f"{mpath}: pack format version {manifest.get('version')!r}; this hamengine "
                            f"reads version {VERSION}: repack with this version")
        self.manifest: dict[str, Any] = manifest
        self.fingerprint = fingerprint(manifest, raw)
        self.classes: tuple[str, ...] = tuple(manifest["classes"])
        self.image_size: int = int(manifest["image"]["size"])
        self._shards: dict[str, list[Shard]] = {}
        for s in manifest["shards"]:
            p = self.path / s["name"]
            shard = Shard(s["name"], s["split"], p, index_path_for(p), int(s["samples"]), int(s["bytes"]),
                          s["sha256"])
            self._shards.setdefault(shard.split, []).append(shard)
        self._index: dict[str, _SplitIndex] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._maps: dict[str, mmap.mmap] = {}
        if check_files:
            self.check_files()

    # -- validation -------------------------------------------------------------------------
    def check_files(self) -> None:
        for shard in self.all_shards():
            if not shard.path.is_file():
                raise PackError(f"{shard.path}: shard listed in {MANIFEST} is missing; {_fix_hint()}")
            size = shard.path.stat().st_size
            if size != shard.bytes:
                raise PackError(f"{shard.path}: {size} bytes, the manifest says {shard.bytes} (truncated or "
                                f"replaced); {_fix_hint()}")
            if not shard.idx_path.is_file():
                raise PackError(f"{shard.idx_path}: index of {shard.name} is missing; {_fix_hint()}")

    # -- listing ----------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        """Splits that hold at least one sample, in manifest order."""
        return tuple(s for s, info in self.manifest["splits"].items() if info["samples"] > 0)

    def all_shards(self) -> list[Shard]:
        return [s for shards in self._shards.values() for s in shards]

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            known = ", ".join(self.manifest["splits"])
            raise PackError(f"{self.path}: no split {split!r} in this pack (splits: {known})")

    def shards(self, split: str) -> list[Shard]:
        self._check_split(split)
        return list(self._shards.get(split, []))

    def num_samples(self, split: str) -> int:
        self._check_split(split)
        return int(self.manifest["splits"][split]["samples"])

    def class_counts(self, split: str) -> dict[str, int]:
        self._check_split(split)
        return dict(self.manifest["splits"][split]["classes"])

    # -- index ------------------------------------------------------------------------------
    def _split_index(self, split: str) -> _SplitIndex:
        if split in self._index:
            return self._index[split]
        keys: list[str] = []
        shard_ids, offs, sizes = [], [], []
        for si, shard in enumerate(self.shards(split)):
            try:
                entries = read_index(shard.idx_path)
            except TarIndexError as e:
                raise PackError(f"{e}; {_fix_hint()}") from None
            if len(entries) != shard.samples:
                raise PackError(f"{shard.idx_path}: {len(entries)} samples, the manifest says "
                                f"{shard.samples}; {_fix_hint()}")
            for line, entry in enumerate(entries, start=2):
                by_ext = {c.ext: c for c in entry}
                if set(by_ext) != set(COMPONENTS):
                    raise PackError(f"{shard.idx_path}, line {line}: components {sorted(by_ext)}, "
                                    f"expected {list(COMPONENTS)}; {_fix_hint()}")
                keys.append(entry[0].name.split(".", 1)[0])
                shard_ids.append(si)
                offs.append([by_ext[e].offset for e in COMPONENTS])
                sizes.append([by_ext[e].size for e in COMPONENTS])
        idx = _SplitIndex(keys, np.asarray(shard_ids, np.int32).reshape(-1),
                          np.asarray(offs, np.int64).reshape(-1, 3), np.asarray(sizes, np.int64).reshape(-1, 3))
        self._index[split] = idx
        return idx

    def _map(self, shard: Shard) -> mmap.mmap:
        m = self._maps.get(shard.name)
        if m is None:
            try:
                with open(shard.path, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise PackError(f"{shard.path}: cannot open shard ({e}); {_fix_hint()}") from None
            self._maps[shard.name] = m
        return m

    def _component(self, split: str, i: int, which: int) -> bytes:
        idx = self._split_index(split)
        n = len(idx.keys)
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for split {split!r} ({n} samples)")
        shard = self._shards[split][int(idx.shard[i])]
        off, size = int(idx.offsets[i, which]), int(idx.sizes[i, which])
        m = self._map(shard)
        if off + size > len(m):
            raise PackError(f"{shard.path}: sample {idx.keys[i]} runs past the end of the shard; {_fix_hint()}")
        return m[off:off + size]

    # -- access -----------------------------------------------------------------------------
    def keys(self, split: str) -> list[str]:
        return list(self._split_index(split).keys)

    def jpeg(self, split: str, i: int) -> bytes:
        return self._component(split, i, 1)

    def label(self, split: str, i: int) -> int:
        return int(self._component(split, i, 0))

    def labels(self, split: str) -> np.ndarray:
        """int64[N] class indices in storage order (the order loaders iterate without shuffling)."""
        if split not in self._labels:
            n = len(self._split_index(split).keys)
            self._labels[split] = np.fromiter((self.label(split, i) for i in range(n)), np.int64, count=n)
        return self._labels[split].copy()

    def meta(self, split: str, i: int) -> dict[str, Any]:
        return json.loads(self._component(split, i, 2))

    def sample(self, split: str, i: int) -> Sample:
        return Sample(self._split_index(split).keys[i], self.jpeg(split, i), self.label(split, i),
                      self.meta(split, i))

    def iter_samples(self, split: str) -> Iterator[Sample]:
        for i in range(self.num_samples(split)):
            yield self.sample(split, i)

    def metadata(self, split: str) -> list[dict[str, Any]]:
        return [self.meta(split, i) for i in range(self.num_samples(split))]

    def meta_schema(self) -> MetaSchema:
        """The metadata encoding of this pack: the manifest's `metadata` record (packs written before it
        existed: fitted now from the train split's rows, as `pack` would have)."""

        rec = self.manifest.get("metadata")
        if rec is not None:
            return MetaSchema.from_record(rec)
        return fit_schema(self.metadata("train") if "train" in self.manifest["splits"] else [])

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __getstate__(self) -> dict[str, Any]:
        # mmaps do not pickle (DataLoader workers, spawn); each process maps the shards itself.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_samples(s)}" for s in self.manifest["splits"])
        return f"Pack({str(self.path)!r}, {counts}, size={self.image_size})"
