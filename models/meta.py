"""Metadata fusion: image features and patient/lesion metadata joined before the classifier.

After Gessert et al. (ISIC 2019 winners, "Skin lesion classification using ensembles of multi-
resolution EfficientNets with meta data", 2020): the backbone's pooled features [N, F] and a small
MLP over the metadata vector [N, M] (loaders/ingest/metadata.py) are concatenated and one linear layer
classifies them. Any registry model works: its own head is replaced by an identity, so the
backbone (and Grad-CAM's target layer in it) is exactly the image model.

Without metadata (`meta=None`: predict without --age/--sex/--site, Grad-CAM, a loader without
cfg.meta) every row gets the schema's "all missing" encoding, which training showed the model
through metadata dropout (engine/train/trainer.py), so the prediction degrades instead of failing.
"""
from __future__ import annotations

import torch
from torch import nn

META_HIDDEN = 64  # small: ~20 inputs, ~7,000 train images (Gessert et al. used 256 on 25k images)


def _detach_head(model: nn.Module, prefix: str) -> int:
    """Replace the module at state-dict prefix (e.g. 'fc.', 'classifier.2.') by an identity and
    return its input width (the pooled feature size)."""
    path = prefix.rstrip(".").split(".")
    parent = model
    for name in path[:-1]:
        parent = getattr(parent, name) if not name.isdigit() else parent[int(name)]
    last = path[-1]
    head = parent[int(last)] if last.isdigit() else getattr(parent, last)
    linear = head if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    if last.isdigit():
        parent[int(last)] = nn.Identity()
    else:
        setattr(parent, last, nn.Identity())
    return int(linear.in_features)


class MetaFusion(nn.Module):
    """backbone(x) -> [N, F]; mlp(meta) -> [N, H]; head([F | H]) -> [N, C]."""

    def __init__(self, backbone: nn.Module, head_prefix: str, missing: torch.Tensor, num_classes: int,
                 hidden: int = META_HIDDEN):
        super().__init__()
        features = _detach_head(backbone, head_prefix)
        self.backbone = backbone
        width = int(missing.numel())
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.SiLU(inplace=True),
                                 nn.Dropout(0.2), nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
                                 nn.SiLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(features + hidden, num_classes)
        self.register_buffer("missing", missing.detach().float().clone())  # [M]: "no metadata" encoding

    @property
    def meta_width(self) -> int:
        return int(self.missing.numel())

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        f = self.backbone(x)  # N x F (the registry model without its head)
        if meta is None:
            meta = self.missing.expand(x.shape[0], -1)
        m = self.mlp(meta.to(dtype=f.dtype if f.is_floating_point() else torch.float32))  # N x H
        return self.head(self.dropout(torch.cat([f, m.to(f.dtype)], dim=1)))  # N x C
