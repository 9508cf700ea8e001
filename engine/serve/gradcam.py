"""Grad-CAM (Selvaraju et al. 2017) for every registry model, plus overlays and a contact sheet.

cam = ReLU(sum_k alpha_k * A_k), alpha_k = spatial mean of d(logit_target)/dA_k, where A is the output
of the architecture's last spatial feature block (hamengine.models.gradcam_target_layer), upsampled
to the input size and scaled to [0, 1] per image.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hamengine.config import CLASS_NAMES
from hamengine.engine.evaluate.predict import Predictor
from hamengine.errors import ConfigError
from hamengine.loaders.ingest.imaging import BadImage
from hamengine.models import gradcam_target_layer


class GradCAM:
    """Hooks one layer of a model in eval mode. Use as a callable; `close()` removes the hook."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        self.model = model
        self._act: torch.Tensor | None = None
        self._hook = layer.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        self._act = out  # N x K x h x w, still in the autograd graph

    def close(self) -> None:
        self._hook.remove()

    def __call__(self, x: torch.Tensor, target: int | Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, 3, S, S] -> (cam float [N, S, S] in [0, 1], target class [N], softmax probs [N, C]).
        target None: the predicted class of each image."""
        # Gradients w.r.t. the activation only: the input requires grad so the graph exists even
        # for frozen weights; no parameter .grad is written (autograd.grad, not backward).
        x = x.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x).float()  # N x C
            if self._act is None:
                raise RuntimeError("Grad-CAM target layer was not run by the model's forward")
            act = self._act
            if target is None:
                cls = logits.argmax(dim=1)
            elif isinstance(target, int):
                cls = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
            else:
                cls = torch.as_tensor(list(target), dtype=torch.long, device=x.device)
            score = logits.gather(1, cls[:, None]).sum()
            (grad,) = torch.autograd.grad(score, act)
        weights = grad.float().mean(dim=(2, 3), keepdim=True)  # N x K x 1 x 1
        cam = F.relu((weights * act.detach().float()).sum(dim=1, keepdim=True))  # N x 1 x h x w
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
        self._act = None
        return (cam / peak).clamp_(0, 1), cls, torch.softmax(logits.detach(), dim=1)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Heatmap (turbo colormap) blended over an RGB image of the cam's size. The blend weight grows
    with the heat (alpha/4 at 0, alpha at 1), so cold regions keep showing the lesion itself."""
    from matplotlib import colormaps

    c = np.clip(cam, 0, 1)
    heat = (colormaps["turbo"](c)[..., :3] * 255).astype(np.float32)  # H x W x 3
    w = (alpha * (0.25 + 0.75 * c))[..., None]  # H x W x 1
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip((1 - w) * base + w * heat, 0, 255).astype(np.uint8))


@dataclass
class Explanation:
    crop: Image.Image  # what the model saw (S x S)
    cam: np.ndarray  # float [S, S] in [0, 1]
    overlay: Image.Image
    target: int  # explained class index
    probs: np.ndarray  # calibrated probabilities [C]


def explain_tensor(predictor, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalized batch [N, 3, S, S] -> (cams [N, S, S], target classes [N]) with the predictor's model."""

    layer = gradcam_target_layer(predictor.model, predictor.model_name)
    cam = GradCAM(predictor.model, layer)
    try:
        maps, cls, _ = cam(x.to(predictor.device), target)
    finally:
        cam.close()
    return maps.cpu().numpy(), cls.cpu().numpy()


def explain(predictor, image, target: int | None = None) -> Explanation:
    crop, x = predictor.preprocess(image)
    probs = predictor.predict_tensor(x[None])[0]
    # No class asked for: explain the predicted one as predict and serve report it (the run's TTA,
    # temperature and decision biases), not the argmax of a single unadjusted view.
    target = int(probs.argmax()) if target is None else target
    maps, cls = explain_tensor(predictor, x[None], target)
    return Explanation(crop, maps[0], overlay(crop, maps[0]), int(cls[0]), probs)


def explain_image(predictor, image, target: int | None = None) -> tuple[Image.Image, int]:
    """(overlay image, explained class index): the call the web app makes."""
    e = explain(predictor, image, target)
    return e.overlay, e.target


def _panel_title(name: str, e: Explanation, classes: Sequence[str]) -> str:
    pred = int(e.probs.argmax())
    dx = classes[e.target]
    return (f"{name}\npred {classes[pred]} {e.probs[pred]:.2f} | Grad-CAM for {dx} "
            f"({CLASS_NAMES.get(dx, dx)})")


def save_panel(e: Explanation, name: str, classes: Sequence[str], path: Path) -> Path:
    """Input crop and overlay side by side, one PNG."""
    import matplotlib.pyplot as plt

    from hamengine.engine.evaluate.plots_eval import (
        save_figure,  # lazy: matplotlib only when a figure is drawn
    )

    fig, axes = plt.subplots(1, 2, figsize=(7, 3.8))
    axes[0].imshow(e.crop)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(e.overlay)
    axes[1].set_title("Grad-CAM", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(_panel_title(name, e, classes), fontsize=8)
    return save_figure(fig, path)


def save_contact_sheet(items: Sequence[tuple[str, Explanation]], classes: Sequence[str], path: Path,
                       cols: int = 4) -> Path:
    import matplotlib.pyplot as plt

    from hamengine.engine.evaluate.plots_eval import (
        save_figure,  # lazy: matplotlib only when a figure is drawn
    )

    n = max(1, len(items))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(items):
            name, e = items[k]
            ax.imshow(e.overlay)
            ax.set_title(_panel_title(name, e, classes).replace(" | ", "\n"), fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def explain_files(run: str | Path, images: Sequence[str | Path], out: str | Path, dx: str | None = None,
                  checkpoint: str | None = None, device: str = "auto") -> dict:
    """`hamengine explain`: a panel PNG per readable image plus contact_sheet.png in `out`."""

    predictor = Predictor(run, checkpoint=checkpoint, device=device)
    classes = tuple(predictor.classes)
    if dx is not None and dx not in classes:
        raise ConfigError(f"--class {dx!r} is not one of {', '.join(classes)}")
    target = classes.index(dx) if dx is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done: list[tuple[str, Explanation]] = []
    rows: list[dict] = []
    used: set[str] = set()
    for path in images:
        name = Path(path).stem
        stem = name
        k = 1
        while stem in used:  # two inputs with one name (different folders) keep both panels
            k += 1
            stem = f"{name}-{k}"
        try:
            e = explain(predictor, path, target)
        except BadImage as err:
            rows.append({"image": str(path), "error": str(err)})
            continue
        used.add(stem)
        png = save_panel(e, name, classes, out / f"{stem}_gradcam.png")
        pred = int(e.probs.argmax())
        rows.append({"image": str(path), "png": str(png), "explained": classes[e.target],
                     "predicted": classes[pred], "probability": float(e.probs[pred])})
        done.append((name, e))
    sheet = save_contact_sheet(done, classes, out / "contact_sheet.png")
    return {"run": str(run), "model": predictor.model_name, "images": rows, "contact_sheet": str(sheet),
            "failed": sum("error" in r for r in rows)}
