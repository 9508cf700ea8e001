"""HamNet: a small residual CNN for dermoscopy images, fast on CPU at 112-160 px.

Stem (two 3x3 convs, stride 2) -> 4 stages of residual blocks (BN + SiLU, squeeze-excitation) ->
global average pool -> dropout -> linear head. ~2.5 M parameters at the default widths.
Dermoscopy classes differ by colour and texture more than by shape, so the stem keeps full
resolution for one extra conv before downsampling, and SE re-weights channels (colour cues).
"""
from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: N x C x H x W
        s = x.mean((2, 3), keepdim=True)  # N x C x 1 x 1
        s = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(s))))
        return x * s


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Basic residual block (3x3, 3x3) with SE; a 1x1 strided projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = True):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=False)
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.proj = (nn.Identity() if stride == 1 and cin == cout
                     else conv_bn(cin, cout, 1, stride, act=False))
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.conv2(self.conv1(x))) + self.proj(x))


class HamNet(nn.Module):
    def __init__(self, num_classes: int = 7, widths: tuple[int, ...] = (32, 64, 128, 256),
                 depths: tuple[int, ...] = (1, 2, 2, 1), stem: int = 24, dropout: float = 0.2,
                 se: bool = True):
        super().__init__()
        # Stem: S -> S/2 -> S/4 (the max-pool-free downsampling keeps small texture).
        self.stem = nn.Sequential(conv_bn(3, stem, 3, 2), conv_bn(stem, widths[0], 3, 2))
        stages = []
        cin = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths, strict=False)):
            blocks = [ResBlock(cin, w, stride=1 if i == 0 else 2, se=se)]
            blocks += [ResBlock(w, w, se=se) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)  # final feature map: S/32
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: every block starts as identity (stable
        # early training at high learning rates).
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2[1].weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # N x C x S/32 x S/32

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: N x 3 x S x S -> N x classes
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.head(self.dropout(x))
