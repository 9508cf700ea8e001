"""The model registry: every model trains a step at a small size (channels_last input accepted),
has a 7-class head and its known parameter count; pretrained loading and its offline error."""
from __future__ import annotations

import urllib.error

import pytest
import torch

from hamengine.models import PretrainedError, create_model, gradcam_target_layer, list_models, model_info

# torchvision's published parameter counts with the 1000-class head, minus (1000 - 7) x (in + 1).
EXPECTED_PARAMS = {
    "resnet18": 11_689_512 - 993 * 513,
    "resnet34": 21_797_672 - 993 * 513,
    "resnet50": 25_557_032 - 993 * 2049,
    "efficientnet_b0": 5_288_548 - 993 * 1281,
    "efficientnet_b2": 9_109_994 - 993 * 1409,
    "convnext_tiny": 28_589_128 - 993 * 769,
    "mobilenet_v3_large": 5_483_032 - 993 * 1281,
}


def test_registry_lists_all_architectures():
    assert set(list_models()) == {"hamnet", *EXPECTED_PARAMS}


HEAVY = {"efficientnet_b0", "efficientnet_b2", "resnet50"}  # 10-15 s each on 2 cores: slow


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in list_models()])
def test_forward_backward_channels_last(name):
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    params = sum(p.numel() for p in model.parameters())
    if name == "hamnet":
        assert 1_000_000 < params < 5_000_000
    else:
        assert params == EXPECTED_PARAMS[name]
    # Grad-CAM layer: a module of this model whose output is a spatial feature map.
    layer = gradcam_target_layer(model, name)
    assert any(layer is m for m in model.modules())
    feats = {}
    layer.register_forward_hook(lambda m, i, o: feats.setdefault("out", o))
    model.eval()
    with torch.no_grad():
        model(x)
    assert feats["out"].ndim == 4 and feats["out"].shape[0] == 2


def test_model_info_counts_flops():
    info = model_info("resnet50", 224)
    # ResNet-50 is ~4.1 G multiply-adds at 224 px = ~8.2 GFLOPs at 2 FLOPs per multiply-add.
    assert 8.0 < info["gflops"] < 8.4 and info["params"] == EXPECTED_PARAMS["resnet50"]
    small = model_info("hamnet", 128)
    assert small["gflops"] < model_info("hamnet", 224)["gflops"]


def test_pretrained_from_local_file_loads_backbone(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    imagenet = resnet18(num_classes=1000)  # stands for downloaded ImageNet weights
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    model = create_model("resnet18", pretrained_path=path)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc.out_features == 7
    with pytest.raises(PretrainedError, match="do not fit"):
        create_model("resnet34", pretrained_path=path)


def test_pretrained_offline_names_the_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedError) as err:
        create_model("resnet18", pretrained=True)
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "--pretrained-path" in msg
    with pytest.raises(PretrainedError, match="no ImageNet weights"):
        create_model("hamnet", pretrained=True)
