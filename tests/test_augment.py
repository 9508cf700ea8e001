"""The batched augmentation maths: the separable crop-flip path samples exactly where grid_sample does."""
from __future__ import annotations

import pytest
import torch

from hamengine.config import AugConfig, AugPreset
from hamengine.loaders.kinds import augment, crop_cv


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


@pytest.mark.skipif(not crop_cv.available(torch.float32), reason="OpenCV is not installed")
@pytest.mark.parametrize("hw", [(80, 107), (64, 64)])
@pytest.mark.parametrize("size", [64, 56])
def test_crop_flip_opencv_equals_grid_sample(hw, size):
    """The OpenCV kernel samples where warp_batch does: equal to one uint8 level inside the crop
    (OpenCV's fixed-point rounding), except the outer ring, where OpenCV clamps to the crop box."""
    h, w = hw
    gen = torch.Generator().manual_seed(size * h)
    cache = torch.randint(0, 256, (12, 3, h, w), dtype=torch.uint8, generator=gen)
    idx = torch.tensor([3, 0, 11, 3, 7, 5, 2, 9, 1, 4, 6])
    aug = AugConfig(preset=AugPreset.CROP_FLIP).effective()
    p = augment.sample_params(gen, idx.numel(), h, w, aug)
    assert p.hflip.any() and p.vflip.any() and not p.hflip.all()
    a, b = augment.normalize_coefficients(torch.device("cpu"))
    ref = augment.warp_batch(cache[idx].float(), p, size, rotation=False)  # N,3,S,S in [0, 255]

    kernel = crop_cv.CropFlipCV(cache, size, torch.float32, a, b)
    got = kernel(idx, p, torch.empty(idx.numel(), 3, size, size))
    levels = (got - b) / a  # back to [0, 255]
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (levels[inner] - ref[inner]).abs().max() <= 1.01

    # A flip on the wrong axis is far outside that tolerance.
    swapped = augment.AugParams(p.box, p.angle, p.vflip, p.hflip, p.brightness, p.contrast,
                                p.saturation, p.hue)
    wrong = (kernel(idx, swapped, torch.empty_like(got)) - b) / a
    assert (wrong[inner] - ref[inner]).abs().max() > 50


@pytest.mark.skipif(not crop_cv.available(torch.bfloat16), reason="OpenCV is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_crop_flip_opencv_lut_rounds_like_a_cast(dtype):
    """The lookup table writes what the float32 result cast to `dtype` would be, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    cache = torch.randint(0, 256, (5, 3, 40, 52), dtype=torch.uint8, generator=gen)
    idx = torch.tensor([4, 1, 0, 2])
    p = augment.sample_params(gen, 4, 40, 52, AugConfig(preset=AugPreset.CROP_FLIP).effective())
    a, b = augment.normalize_coefficients(torch.device("cpu"))
    f32 = crop_cv.CropFlipCV(cache, 32, torch.float32, a, b)(idx, p, torch.empty(4, 3, 32, 32))
    low = crop_cv.CropFlipCV(cache, 32, dtype, a, b)(idx, p, torch.empty(4, 3, 32, 32, dtype=dtype))
    assert torch.equal(low, f32.to(dtype))


@pytest.mark.skipif(not crop_cv.available(torch.bfloat16), reason="OpenCV is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crop_flip_opencv_layouts_give_the_same_bits(dtype):
    """Interleaved cache and/or channels_last output (what the trainer feeds where channels_last
    measures faster): the same values as planar in, NCHW out, in the requested strides."""
    gen = torch.Generator().manual_seed(11)
    cache = torch.randint(0, 256, (6, 3, 40, 52), dtype=torch.uint8, generator=gen)
    idx = torch.tensor([5, 1, 0, 2, 4, 3, 1])
    p = augment.sample_params(gen, 7, 40, 52, AugConfig(preset=AugPreset.CROP_FLIP).effective())
    assert p.hflip.any() and p.vflip.any()
    a, b = augment.normalize_coefficients(torch.device("cpu"))
    ref = crop_cv.CropFlipCV(cache, 32, dtype, a, b)(idx, p, torch.empty(7, 3, 32, 32, dtype=dtype))
    hwc = crop_cv.interleaved(cache)
    assert not hwc.is_contiguous() and torch.equal(hwc, cache)
    for src in (cache, hwc):
        kernel = crop_cv.CropFlipCV(src, 32, dtype, a, b)
        for fmt in (torch.contiguous_format, torch.channels_last):
            out = torch.empty(7, 3, 32, 32, dtype=dtype, memory_format=fmt)
            got = kernel(idx, p, out)
            assert got is out and got.is_contiguous(memory_format=fmt)
            assert torch.equal(got, ref)
