"""The model registry: our HamNet plus torchvision backbones, each with a num_classes head."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hamengine.errors import ConfigError
from hamengine.models.hamnet import HamNet
from hamengine.models.meta import MetaFusion
from hamengine.models.pretrained import PretrainedError, imagenet_state_dict, load_backbone, read_weights_file
from hamengine.models.wrappers import unwrap


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    head: tuple[str, ...]  # state-dict prefixes of the classification head (replaced, never loaded)
    gradcam: Callable[[nn.Module], nn.Module]  # last spatial feature block (N x C x h x w output)
    torchvision: bool = True


SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("hamnet", "our residual CNN with squeeze-excitation (CPU-friendly)", ("head.",),
              lambda m: m.stages[-1], torchvision=False),
    ModelSpec("resnet18", "torchvision ResNet-18", ("fc.",), lambda m: m.layer4[-1]),
    ModelSpec("resnet34", "torchvision ResNet-34", ("fc.",), lambda m: m.layer4[-1]),
    ModelSpec("resnet50", "torchvision ResNet-50 (v1.5)", ("fc.",), lambda m: m.layer4[-1]),
    ModelSpec("efficientnet_b0", "torchvision EfficientNet-B0", ("classifier.",), lambda m: m.features[-1]),
    ModelSpec("efficientnet_b2", "torchvision EfficientNet-B2", ("classifier.",), lambda m: m.features[-1]),
    ModelSpec("convnext_tiny", "torchvision ConvNeXt-T", ("classifier.2.",), lambda m: m.features[-1]),
    ModelSpec("mobilenet_v3_large", "torchvision MobileNetV3-Large", ("classifier.3.",),
              lambda m: m.features[-1]),
)}


def list_models() -> list[str]:
    return list(SPECS)


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ConfigError(f"--model {name!r}: unknown model; choose one of {', '.join(SPECS)} "
                          f"(`hamengine models` lists them)") from None


def create_model(name: str, num_classes: int = 7, pretrained: bool = False,
                 pretrained_path: str | Path | None = None, meta_missing: torch.Tensor | None = None) -> nn.Module:
    """A fresh model with a `num_classes` head. `pretrained_path` (a state dict or a hamengine
    checkpoint) wins over `pretrained` (torchvision's ImageNet weights); heads are never loaded.
    meta_missing (the metadata schema's "all missing" vector [M]): the model fuses metadata
    (models/meta.py) and its forward takes (images, meta=None)."""
    spec = get_spec(name)
    if spec.torchvision:
        from torchvision.models import get_model
        model = get_model(name, weights=None, num_classes=num_classes)
    else:
        model = HamNet(num_classes=num_classes)
    if pretrained_path:
        load_backbone(model, read_weights_file(pretrained_path), spec.head, str(pretrained_path))
    elif pretrained:
        if not spec.torchvision:
            raise PretrainedError(f"{name} has no ImageNet weights: pass --pretrained-path FILE "
                                  "(a hamengine checkpoint) or train from scratch")
        load_backbone(model, imagenet_state_dict(name), spec.head, f"ImageNet weights of {name}")
    if meta_missing is not None:

        model = MetaFusion(model, spec.head[0], meta_missing, num_classes)
    return model


def gradcam_target_layer(model: nn.Module, name: str) -> nn.Module:
    """The module whose output Grad-CAM uses (last spatial features) for architecture `name`.
    Accepts compiled (`_orig_mod`) and DDP (`module`) wrappers, and a metadata-fused model (the
    image branch: its backbone)."""

    plain = unwrap(model)
    return get_spec(name).gradcam(plain.backbone if isinstance(plain, MetaFusion) else plain)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_info(name: str, size: int = 224) -> dict:
    """Parameter count and GFLOPs of one forward pass of one image at size x size.
    FLOPs as counted by torch.utils.flop_counter (2 per multiply-add; torchvision's tables list
    multiply-adds, i.e. half these numbers)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = get_spec(name)
    # Build and run on the meta device: shapes only, no memory or compute (resnet50 at 512 px is free).
    with torch.device("meta"):
        model = create_model(name)
    model.eval()
    x = torch.empty(1, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return {"name": name, "description": spec.description, "params": count_params(model),
            "gflops": counter.get_total_flops() / 1e9, "size": size}


__all__ = ["ModelSpec", "PretrainedError", "create_model", "gradcam_target_layer", "list_models",
           "model_info", "count_params", "get_spec"]
