"""Pretrained weights: ImageNet weights through torchvision's weights API (cached in
TORCH_HOME/hub/checkpoints), or a local file. Offline without the file: a clear error that names
the file to download and where to put it."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hamengine.errors import UserError
from hamengine.models.wrappers import strip_wrapper_prefixes


class PretrainedError(UserError, RuntimeError):
    """Pretrained weights cannot be found or loaded; the message says what to do."""


def cache_path(url: str) -> Path:
    """Where torchvision keeps (and looks for) a downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights for `name`: from the cache, else downloaded."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    target = cache_path(weights.url)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; hash mismatch a RuntimeError
        raise PretrainedError(
            f"cannot get ImageNet weights for {name} ({e}). Offline? Download {weights.url} and put it "
            f"at {target} (set TORCH_HOME to move the cache), or pass --pretrained-path FILE.") from None


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain state dict (.pth) or a hamengine checkpoint (its 'model')."""
    p = Path(path)
    if not p.is_file():
        raise PretrainedError(f"pretrained weights file {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedError(f"{p}: not a readable weights file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a hamengine checkpoint
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{p}: expected a state dict (parameter name -> tensor)")
    return image_branch(strip_wrapper_prefixes(obj))


def image_branch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A metadata-fused model's weights (models/meta.py: backbone.*, mlp.*, head.*, missing) -> its
    backbone's, which is a plain registry model without its head; anything else unchanged."""
    if "missing" not in state or not any(k.startswith("backbone.") for k in state):
        return state
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], head_prefixes: tuple[str, ...],
                  source: str) -> None:
    """Load every matching tensor; the classification head may differ (1000 vs 7 classes).
    Any other missing or mismatched tensor is an error: the file is for another architecture."""
    own = model.state_dict()
    keep: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for k, v in state.items():
        if k in own and own[k].shape == v.shape:
            keep[k] = v
        elif not k.startswith(head_prefixes):
            bad.append(k if k not in own else f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}")
    missing = [k for k in own if k not in keep and not k.startswith(head_prefixes)]
    if bad or missing:
        detail = "; ".join((bad + [f"missing {m}" for m in missing])[:5])
        raise PretrainedError(f"{source}: weights do not fit this architecture ({detail})")
    model.load_state_dict(keep, strict=False)
