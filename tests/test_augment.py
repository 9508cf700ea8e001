"""The batched augmentation maths: the separable crop-flip path samples exactly where grid_sample does."""
from __future__ import annotations

import pytest
import torch

from hamengine.config import AugConfig, AugPreset
from hamengine.loaders import augment


@pytest.mark.parametrize("hw", [(80, 107), (96, 128), (64, 64)])
@pytest.mark.parametrize("size", [64, 56])
def test_crop_flip_separable_equals_grid_sample(hw, size):
    h, w = hw
    gen = torch.Generator().manual_seed(size + h)
    cache = torch.randint(0, 256, (12, 3, h, w), dtype=torch.uint8, generator=gen)
    idx = torch.tensor([3, 0, 11, 3, 7, 5, 2, 9, 1])
    aug = AugConfig(preset=AugPreset.CROP_FLIP).effective()
    assert not aug.rotation and not aug.has_jitter
    p = augment.sample_params(gen, idx.numel(), h, w, aug)
    assert p.hflip.any() and p.vflip.any() and not p.hflip.all()  # both flips exercised

    a, b = augment.normalize_coefficients(torch.device("cpu"))
    ref = augment.warp_batch(cache[idx].float(), p, size, rotation=False).mul_(a).add_(b)
    out = torch.empty(idx.numel(), 3, size, size).to(memory_format=torch.channels_last)
    got = augment.crop_flip_separable(cache, idx, p, size, out, a, b, chunk=4)
    assert got is out
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)

    # A wrong tap (e.g. the flip applied to the other axis) is far outside that tolerance.
    swapped = augment.AugParams(p.box, p.angle, p.vflip, p.hflip, p.brightness, p.contrast,
                                p.saturation, p.hue)
    wrong = augment.crop_flip_separable(cache, idx, swapped, size, torch.empty_like(out), a, b)
    assert (wrong - ref).abs().max() > 0.5
