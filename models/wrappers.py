"""The wrappers training puts around a model, and how to see through them.

DistributedDataParallel keeps the model as `.module` and torch.compile as `._orig_mod`; their
state dicts name every tensor with that prefix (`module.`, `_orig_mod.`, or both, in either order).
Checkpoints store the plain model, and every reader of weights files strips the prefixes, so a
state dict saved from a wrapped model loads into a plain one.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from torch import nn

WRAPPER_ATTRS = ("_orig_mod", "module")  # torch.compile, DistributedDataParallel
WRAPPER_PREFIXES = tuple(f"{a}." for a in WRAPPER_ATTRS)

V = TypeVar("V")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under any nesting of torch.compile and DDP wrappers."""
    while True:
        inner = next((m for a in WRAPPER_ATTRS if isinstance(m := getattr(model, a, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


def strip_wrapper_prefix(key: str) -> str:
    """'module._orig_mod.fc.weight' (or '_orig_mod.module.fc.weight') -> 'fc.weight'."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def strip_wrapper_prefixes(state: Mapping[str, V]) -> dict[str, V]:
    """A state dict with the DDP / torch.compile prefixes removed from every key."""
    return {strip_wrapper_prefix(k): v for k, v in state.items()}
