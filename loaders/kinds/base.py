"""The Loader base class and what every loader shares: epoch order, DDP sharding, class-balanced
sampling, and the output dtype / memory format.

Epoch plan (the same in every kind that can follow it: resident, torch, folder):
- train: a permutation of the split seeded by (seed, epoch) -- or, with `balance_sampler`, N draws
  with replacement weighted 1/class-count -- cut into world_size strided shares (rank r takes
  positions r, r+w, ...), each truncated to N // w, then to whole batches (drop_last). Every rank
  therefore gets the same number of full batches, and the shares are disjoint.
- eval (val/test): storage order; rank r takes the contiguous block [N*r//w, N*(r+1)//w) (DALI's
  shard formula, so every kind shards the same way); every sample exactly once across ranks.
  Shares differ by at most one sample, so to give every rank the same number of batches a short
  rank splits its last batch in two ("uneven but equal batch counts"; no padding, no mask: the
  contract's (images, labels) stays exact). Only with batch_size 1 can that last batch be empty.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from hamengine.config import LoaderConfig, MemoryFormat, Precision
from hamengine.errors import ConfigError
from hamengine.loaders.pack.records import Pack, PackError

TRAIN_SPLIT = "train"
DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32}
Batch = tuple[torch.Tensor, torch.Tensor]  # (images, labels); with cfg.meta a third item, metadata [N, M]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several ints (seed, epoch, rank, ...): distinct tuples, unrelated streams."""
    h = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def eval_share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous eval block (DALI's reader uses the same formula)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def eval_batch_sizes(n: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    """Batch sizes of rank's eval share; the same count on every rank (see module doc)."""
    start, end = eval_share(n, rank, world_size)
    share = end - start
    longest = max(b - a for a, b in (eval_share(n, r, world_size) for r in range(world_size)))
    count = math.ceil(longest / batch_size)
    sizes = [batch_size] * (share // batch_size) + ([share % batch_size] if share % batch_size else [])
    while len(sizes) < count:  # short rank: split its last batch so the counts match
        last = sizes.pop() if sizes else 0
        sizes += [last - last // 2, last // 2]
    return sizes


def train_order(labels: np.ndarray, *, seed: int, epoch: int, rank: int, world_size: int,
                batch_size: int, balance: bool) -> np.ndarray:
    """int64[len * batch_size]: the split indices rank reads this epoch, in order."""
    n = len(labels)
    rng = np.random.default_rng(mix_seed(seed, epoch, 0x5EED))
    if balance:
        counts = np.bincount(labels, minlength=int(labels.max()) + 1 if n else 1).astype(np.float64)
        w = 1.0 / counts[labels]
        order = rng.choice(n, size=n, replace=True, p=w / w.sum())
    else:
        order = rng.permutation(n)
    per_rank = n // world_size
    share = order[rank::world_size][:per_rank]
    return share[: (per_rank // batch_size) * batch_size].astype(np.int64)


def tune_worker_malloc(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: keep freed memory in the worker's heap (glibc) instead of giving
    every 50-100 MB batch tensor back to the kernel and faulting it in again next batch -- measured
    2-4x faster casts / grid_sample in this VM. Workers only: the training process is not touched."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def shutdown_workers(dl: torch.utils.data.DataLoader) -> None:
    """Stop a DataLoader's persistent worker processes now, not whenever the DataLoader is garbage
    collected: a loader's close() must release its processes and shared memory before the next
    loader (or a benchmark's next run) starts. PyTorch has no public call for this, so it is the
    one place that touches the private iterator; a later PyTorch without it just skips the shutdown."""
    it = getattr(dl, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    dl._iterator = None


def resolve_memory_format(fmt: MemoryFormat, device: torch.device) -> torch.memory_format:
    if fmt == MemoryFormat.AUTO:  # a loader used alone; the engine passes its measured choice (resolve_execution)
        return torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return torch.channels_last if fmt == MemoryFormat.CHANNELS_LAST else torch.contiguous_format


def verify_shards(pack: Pack, split: str) -> None:
    """Hash every shard of split against the manifest, so damage fails here, before the first
    batch, with the shard's name -- not later inside a worker or the DALI graph."""
    for shard in pack.shards(split):
        h = hashlib.sha256()
        with open(shard.path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != shard.sha256:
            raise PackError(f"{shard.path}: sha256 differs from the manifest (the shard is damaged or was "
                            f"replaced); re-run `hamengine pack` to rebuild the pack, or `hamengine verify` "
                            f"to list every damaged file")


@dataclass
class EpochPlan:
    """Which samples, in which batches, this rank reads in one epoch."""

    indices: np.ndarray  # int64[num_samples] split indices in read order
    sizes: list[int]  # batch sizes, sum == len(indices)

    def batches(self) -> Iterator[np.ndarray]:
        pos = 0
        for s in self.sizes:
            yield self.indices[pos:pos + s]
            pos += s


class Loader:
    """Base of every loader: (images, labels) batches on `device` (see DESIGN.md, the loader contract).

    images: float (cfg.dtype) [N, 3, S, S], ImageNet-normalized, memory format per cfg; labels:
    int64 [N]. With cfg.meta a third tensor, float32 [N, M]: the pack's metadata encoding
    (loaders/ingest/metadata.py) of the same samples. `len()` is the number of batches per epoch on this
    rank; `num_samples` the number of samples this rank yields per epoch; `total_samples` the
    split's size.

    Kinds implement `batches()`, which yields (images, labels) in the epoch plan's order; `__iter__`
    adds the metadata rows of the plan's index blocks. A kind whose reader chooses its own order
    (DALI) overrides `__iter__` and attaches them by sample key instead."""

    kind = "base"

    def __init__(self, pack: Pack, split: str, cfg: LoaderConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if cfg.batch_size < 1 or cfg.size < 8:
            raise ConfigError(f"batch_size {cfg.batch_size} and size {cfg.size} must be >= 1 and >= 8")
        self.pack, self.split, self.cfg = pack, split, cfg
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.train = split == TRAIN_SPLIT
        self.batch_size = cfg.batch_size
        self.size = cfg.size
        self.dtype = DTYPES[Precision(cfg.dtype)]
        self.memory_format = resolve_memory_format(MemoryFormat(cfg.memory_format), self.device)
        self.aug = cfg.aug.effective()
        self.balance = bool(cfg.balance_sampler) and self.train
        self.epoch = 0
        self.labels = pack.labels(split)  # int64[N], storage order
        self.total_samples = len(self.labels)
        # float32 [N, M] in storage order, encoded once with the pack's schema (train-split age stats)
        self.meta_table = (torch.from_numpy((cfg.meta_schema or pack.meta_schema()).encode(pack.metadata(split)))
                           if cfg.meta else None)
        if self.train and self.total_samples // world_size < self.batch_size:
            raise ConfigError(f"split {split!r} has {self.total_samples} samples: too few for one batch of "
                             f"{self.batch_size} per rank on {world_size} rank(s); lower --batch-size")

    # -- epoch plan ---------------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> EpochPlan:
        e = self.epoch if epoch is None else epoch
        if self.train:
            idx = train_order(self.labels, seed=self.cfg.seed, epoch=e, rank=self.rank,
                              world_size=self.world_size, batch_size=self.batch_size, balance=self.balance)
            return EpochPlan(idx, [self.batch_size] * (len(idx) // self.batch_size))
        start, end = eval_share(self.total_samples, self.rank, self.world_size)
        sizes = eval_batch_sizes(self.total_samples, self.rank, self.world_size, self.batch_size)
        return EpochPlan(np.arange(start, end, dtype=np.int64), sizes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation draws) the next iteration follows."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.train:
            return (self.total_samples // self.world_size) // self.batch_size
        return len(eval_batch_sizes(self.total_samples, self.rank, self.world_size, self.batch_size))

    @property
    def num_samples(self) -> int:
        if self.train:
            return len(self) * self.batch_size
        start, end = eval_share(self.total_samples, self.rank, self.world_size)
        return end - start

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """Cast + memory format of the output (a no-op when already right)."""
        return images.to(dtype=self.dtype, memory_format=self.memory_format)

    def batches(self) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        if self.meta_table is None:
            yield from self.batches()
            return
        # The k-th batch of a plan-order kind holds the plan's k-th index block (strict: a kind that
        # ever yields a different number of batches fails here, never pairs the wrong rows).
        for (images, labels), idx in zip(self.batches(), self.plan().batches(), strict=True):
            yield images, labels, self.meta_rows(idx)

    def meta_rows(self, idx: np.ndarray) -> torch.Tensor:
        """float32 [len(idx), M] on the device: the metadata rows of split indices idx."""
        rows = self.meta_table[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
        if self.device.type == "cuda":  # one small pinned copy, no sync with the running step
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows

    def close(self) -> None:
        """Release worker processes / pipelines; the loader cannot be iterated afterwards."""

    def __del__(self) -> None:
        # A loader dropped without close() (an epoch half read, an exception, a notebook cell) would
        # leave its workers to the DataLoader iterator's own finalizer, which waits ~5 s per worker
        # for them to notice (measured: 10 s for 2 workers, against 0.02 s for close()).
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, a half-built loader: nothing to release
            pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, samples={self.num_samples}, batches={len(self)}, "
                f"batch_size={self.batch_size}, size={self.size}, device={self.device}, rank={self.rank}/"
                f"{self.world_size})")
