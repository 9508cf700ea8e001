"""Grad-CAM: shape and range for every registry model; on images whose only class signal is a small
lesion at a random position, a briefly trained HamNet's heatmap mass lands on the lesion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hamengine.engine.serve.gradcam import GradCAM, overlay
from hamengine.models import create_model, gradcam_target_layer, list_models

S = 72  # HamNet's last stage is ceil(S/32): a 3 x 3 map, enough to tell where a small lesion is


@pytest.mark.parametrize("name", list_models())
def test_shape_and_range_every_model(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    cam = GradCAM(model, gradcam_target_layer(model, name))
    x = torch.randn(2, 3, 64, 64)
    maps, cls, probs = cam(x, target=None)
    assert maps.shape == (2, 64, 64) and cls.shape == (2,) and probs.shape == (2, 7)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(probs[torch.arange(2), cls], probs.max(1).values)  # the predicted class
    maps3, cls3, _ = cam(x, target=3)
    assert cls3.tolist() == [3, 3]
    cam.close()
    assert not any(p.grad is not None for p in model.parameters())  # no parameter gradients written


def lesion_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Skin-coloured noise with one disc lesion (radius 7-10 px of 72) at a random position; the
    class (3 classes) is only the lesion's colour. Returns normalized images, labels, lesion masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S]
    colours = np.array([[0.45, 0.28, 0.18], [0.35, 0.40, 0.55], [0.70, 0.20, 0.25]])
    y = rng.integers(0, 3, n)
    imgs = np.empty((n, 3, S, S), np.float32)
    masks = np.empty((n, S, S), bool)
    for i in range(n):
        img = (np.array([0.85, 0.65, 0.55]) + rng.normal(0, 0.04, 3))[:, None, None] + rng.normal(0, 0.06, (3, S, S))
        r = rng.uniform(7, 10)
        cy, cx = rng.uniform(r + 2, S - r - 2, 2)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[:, m] = colours[y[i]][:, None] + rng.normal(0, 0.05, (3, int(m.sum())))
        imgs[i], masks[i] = img, m
    return (torch.from_numpy(imgs) - 0.5) / 0.25, torch.from_numpy(y), masks


@pytest.mark.slow
def test_heatmap_mass_on_the_lesion() -> None:
    torch.manual_seed(0)
    x, y, _ = lesion_images(288, seed=0)
    model = create_model("hamnet", num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            idx = perm[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt, masks = lesion_images(64, seed=1)
    cam = GradCAM(model, gradcam_target_layer(model, "hamnet"))
    maps, cls, _ = cam(xt)
    cam.close()
    assert (cls == yt).float().mean() >= 0.6  # it learned the task (chance: 1/3)
    maps = maps.numpy()
    mass = (maps * masks).sum((1, 2)) / np.maximum(maps.sum((1, 2)), 1e-9)  # heat inside the lesion
    chance = masks.mean((1, 2))  # a uniform map puts this much inside (about 4%)
    assert np.mean(mass / chance) >= 1.8, f"mass {mass.mean():.3f} vs chance {chance.mean():.3f}"
    assert np.mean(mass > chance) >= 0.75


def test_overlay_blends_image_and_heat() -> None:
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 150, 120))
    cam = np.zeros((32, 32), np.float32)
    cam[8:16, 8:16] = 1.0
    out = np.asarray(overlay(img, cam)).astype(int)
    assert out.shape == (32, 32, 3)
    assert np.abs(out[12, 12] - [200, 150, 120]).sum() > np.abs(out[0, 0] - [200, 150, 120]).sum()
