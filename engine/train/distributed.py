"""torchrun / DDP helpers: process-group setup (NCCL on GPUs, gloo on CPU), rank-0 gating and
reductions of metrics over ranks. Without torchrun's environment everything is single-process."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hamengine.runtime import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        kw: dict[str, Any] = {}
        if device.type == "cuda":
            device = torch.device("cuda", device.index if device.index is not None else local)
            torch.cuda.set_device(device)
            # device_id binds the NCCL communicator to this rank's GPU at init (eager connect):
            # no guessing from the current device at the first collective, no "devices used by this
            # process are currently unknown" warning, and barrier() uses the right GPU.
            kw["device_id"] = device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30), **kw)
    return DistInfo(rank, world, local), device


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over `model` when several ranks run, else `model` itself.

    device_ids=[index] on CUDA (one GPU per process; None on CPU, as DDP requires).
    gradient_as_bucket_view=True: .grad tensors are views into DDP's all-reduce buckets, saving one
    gradient-sized copy per step and the memory of a second gradient copy. Optimizers that keep
    .grad references or call zero_grad(set_to_none=False) work unchanged; detaching .grad (e.g.
    grad.detach_()) is not allowed in this mode."""
    if not info.enabled:
        return model
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (loss sums, counts)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set (a stop request must stop all ranks together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_arrays(arrays: list[np.ndarray], info: DistInfo) -> list[np.ndarray]:
    """Concatenate each array over ranks in rank order (probabilities for AUC need every sample)."""
    if not info.enabled:
        return arrays
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, arrays)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(arrays))]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
