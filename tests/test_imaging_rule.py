"""One rule for opening user images (pack, predict, serve), one stripper of DDP / torch.compile
prefixes, one DataLoader shutdown: each used by every caller, with the same outcome everywhere."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from hamengine.config import CLASSES, MAX_PIXELS
from hamengine.engine.runtime.checkpoint import save_checkpoint
from hamengine.errors import UserError
from hamengine.loaders.ingest.imaging import (
    BadImage,
    ImagePolicy,
    ImageProblem,
    open_image,
    open_rgb,
    process,
)
from hamengine.models import create_model, gradcam_target_layer
from hamengine.models.pretrained import read_weights_file
from hamengine.models.wrappers import strip_wrapper_prefixes, unwrap

SIZE = 32


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A grayscale PNG that claims width x height pixels but holds none (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


class Wrapper(nn.Module):
    """Stands in for DDP (`module`) or torch.compile (`_orig_mod`): the same attribute, the same keys."""

    def __init__(self, attr: str, inner: nn.Module):
        super().__init__()
        setattr(self, attr, inner)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder as `hamengine train` leaves it (config.json + checkpoints/best.pt), with untrained
    HamNet weights saved from a torch.compile(DDP(model)) wrapper: the keys carry both prefixes."""
    run = tmp_path_factory.mktemp("tiny-run")
    (run / "config.json").write_text(json.dumps({"model": "hamnet", "size": SIZE, "classes": list(CLASSES)}))
    torch.manual_seed(0)
    wrapped = Wrapper("_orig_mod", Wrapper("module", create_model("hamnet", num_classes=len(CLASSES))))
    state = wrapped.state_dict()
    assert all(k.startswith("_orig_mod.module.") for k in state)
    save_checkpoint({"epoch": 1, "model_name": "hamnet", "classes": list(CLASSES), "model": state},
                    run / "checkpoints" / "best.pt")
    return run


# ---------------------------------------------------------------- one pixel limit everywhere

def test_one_limit_refuses_the_same_image_in_pack_predict_and_serve(tiny_run, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from hamengine.engine.evaluate.predict import Predictor
    from hamengine.engine.serve.server import ServeLimits, create_app

    assert ServeLimits().max_pixels == MAX_PIXELS == ImagePolicy().max_pixels == 64_000_000
    over = tmp_path / "over.png"
    over.write_bytes(png_header_only(8001, 8000))  # 64,008,000 pixels: just over
    at = tmp_path / "at.png"
    at.write_bytes(png_header_only(8000, 8000))  # exactly the limit: opened, then found truncated

    with pytest.raises(BadImage) as packed:
        process(over.read_bytes(), ImagePolicy())
    predictor = Predictor(tiny_run, device="cpu")
    predicted = predictor.predict_files([over, at])
    assert all(isinstance(r, BadImage) for r in predicted)
    assert packed.value.problem == predicted[0].problem == ImageProblem.TOO_LARGE
    assert predicted[1].problem == ImageProblem.CORRUPT  # the limit itself is allowed
    for err in (packed.value, predicted[0]):
        assert "64,008,000 pixels exceeds the limit of 64,000,000" in str(err)
    assert str(over) in str(predicted[0])  # predict names the file

    with TestClient(create_app(tiny_run, device="cpu")) as client:
        r_over = client.post("/api/predict", files={"image": ("over.png", over.read_bytes(), "image/png")})
        r_at = client.post("/api/predict", files={"image": ("at.png", at.read_bytes(), "image/png")})
        assert client.get("/api/model").json()["max_pixels"] == MAX_PIXELS
    assert r_over.status_code == 413 and "exceeds the limit of 64,000,000" in r_over.json()["detail"]
    assert r_at.status_code == 422 and "truncated" in r_at.json()["detail"]


def test_far_over_limit_is_worded_as_our_limit():
    with pytest.raises(BadImage) as err:
        open_image(png_header_only(20000, 20000))  # over PIL's own refusal threshold too
    assert err.value.problem == ImageProblem.TOO_LARGE
    assert "400,000,000 pixels exceeds the limit of 64,000,000" in str(err.value)


def test_bad_images_are_user_errors_naming_the_file(tmp_path):
    cases = {"empty.jpg": (b"", ImageProblem.EMPTY, "empty file"),
             "notes.jpg": (b"not an image at all\n" * 10, ImageProblem.NOT_AN_IMAGE, "not an image"),
             "half.png": (encode(Image.new("RGB", (64, 64), "red"))[:60], ImageProblem.CORRUPT, "")}
    for name, (data, problem, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImage) as err:
            open_rgb(tmp_path / name)
        assert isinstance(err.value, UserError) and err.value.problem == problem, name
        assert str(err.value).startswith(f"{tmp_path / name}: ") and words in err.value.reason, name
    with pytest.raises(BadImage) as err:
        open_rgb(tmp_path / "missing.jpg")
    assert err.value.problem == ImageProblem.UNREADABLE and "missing.jpg" in str(err.value)
    with pytest.raises(BadImage) as err:  # bytes: no name, the reason only (what a pack manifest records)
        open_image(b"")
    assert str(err.value) == err.value.reason
    with pytest.raises(BadImage) as err:  # an allow-list of formats (serve's) refuses the others
        open_image(encode(Image.new("RGB", (8, 8)), "GIF"), formats=("JPEG", "PNG"))
    assert err.value.problem == ImageProblem.NOT_AN_IMAGE and "(JPEG, PNG)" in str(err.value)


# ---------------------------------------------------------------- one mode rule (pack = predict)

def _modes() -> dict[str, tuple[bytes, np.ndarray]]:
    """Encoded image of each awkward mode -> the 8-bit RGB pixels the rule must produce."""
    dark16 = np.full((SIZE, SIZE), 200, np.uint16)  # 16-bit data: scaled by 65535, so nearly black
    full16 = np.full((SIZE, SIZE), 40 * 257, np.uint16)
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 20, 30), 0  # fully transparent: colour kept, alpha dropped
    palette = Image.new("P", (SIZE, SIZE), 1)
    palette.putpalette([0, 0, 0, 250, 100, 5] + [0] * 762)
    return {
        "I;16 dark": (encode(Image.fromarray(dark16)), np.full(3, 1)),
        "I;16 full": (encode(Image.fromarray(full16)), np.full(3, 40)),
        "F": (encode(Image.fromarray(np.full((SIZE, SIZE), 77.0, np.float32)), "TIFF"), np.full(3, 77)),
        "P": (encode(palette), np.array([250, 100, 5])),
        "RGBA": (encode(Image.fromarray(rgba, "RGBA")), np.array([10, 20, 30])),
        "LA": (encode(Image.new("LA", (SIZE, SIZE), (90, 128))), np.full(3, 90)),
        "1": (encode(Image.new("1", (SIZE, SIZE), 1)), np.full(3, 255)),
        "CMYK": (encode(Image.new("CMYK", (SIZE, SIZE), (0, 0, 0, 0)), "TIFF"), np.full(3, 255)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_modes_become_the_same_rgb_in_pack_and_predict(mode, tiny_run):
    from hamengine.engine.evaluate.predict import Predictor

    data, expected = _modes()[mode]
    rgb = np.asarray(open_rgb(data))
    assert rgb.dtype == np.uint8 and rgb.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(rgb, np.broadcast_to(expected, rgb.shape))
    # predict's preprocessing sees those pixels (the crop of a constant image is that constant) ...
    crop, _ = Predictor(tiny_run, device="cpu").preprocess(data)
    np.testing.assert_array_equal(np.asarray(crop), np.broadcast_to(expected, (SIZE, SIZE, 3)))
    # ... and a pack stores them (lossless enough at quality 100 for a flat image).
    packed = np.asarray(Image.open(io.BytesIO(process(data, ImagePolicy(size=SIZE, quality=100)).jpeg)))
    assert np.abs(packed.astype(int) - expected).max() <= 2


def test_exif_orientation_applied_once(tiny_run):
    stored = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    stored[:, :SIZE] = 255  # left half white as stored; orientation 6 turns it upright (top half white)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG", exif=exif)
    up = np.asarray(open_rgb(buf.getvalue()))
    assert up.shape == (2 * SIZE, SIZE, 3) and up[:SIZE].min() == 255 and up[SIZE:].max() == 0


# ---------------------------------------------------------------- one prefix stripper

def test_wrapper_prefixes_are_stripped_in_any_order(tmp_path):
    t = torch.zeros(1)
    state = {"module._orig_mod.fc.weight": t, "_orig_mod.module.fc.bias": t, "module.head.module.x": t,
             "stem.weight": t}
    assert list(strip_wrapper_prefixes(state)) == ["fc.weight", "fc.bias", "head.module.x", "stem.weight"]
    torch.save(state, tmp_path / "w.pth")
    assert list(read_weights_file(tmp_path / "w.pth")) == list(strip_wrapper_prefixes(state))


def test_unwrap_sees_through_nested_wrappers():
    plain = create_model("hamnet", num_classes=len(CLASSES))
    wrapped = Wrapper("_orig_mod", Wrapper("module", plain))
    assert unwrap(wrapped) is plain and unwrap(plain) is plain
    assert gradcam_target_layer(wrapped, "hamnet") is gradcam_target_layer(plain, "hamnet")


def test_predict_loads_a_checkpoint_saved_from_a_wrapped_model(tiny_run):
    from hamengine.engine.evaluate.predict import load_run

    loaded = load_run(tiny_run, device="cpu")
    saved = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)["model"]
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, saved[f"_orig_mod.module.{key}"])


# ---------------------------------------------------------------- one RunError, serve's user errors

def test_predict_raises_the_run_error_of_engine_run(tmp_path):
    from hamengine.engine.evaluate.predict import Predictor
    from hamengine.engine.runtime.run import RunError

    with pytest.raises(RunError, match="config.json is missing"):
        Predictor(tmp_path, device="cpu")


def test_serve_command_reports_user_errors_with_their_exit_code(tiny_run, tmp_path):
    pytest.importorskip("uvicorn")
    from hamengine.commands.serve import serve

    broken = tmp_path / "broken-run"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.json").write_text((tiny_run / "config.json").read_text())
    (broken / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(serve, [str(broken), "--device", "cpu"])
    assert r.exit_code == 1 and "cannot serve" in r.output and "truncated or corrupt" in r.output
    assert isinstance(r.exception, SystemExit)  # a message and an exit status, no traceback
    r = CliRunner().invoke(serve, [str(tiny_run), "--device", "banana"])
    assert r.exit_code == 2 and "banana" in r.output  # a ConfigError: the usage exit code


# ---------------------------------------------------------------- serve: the expected form field

def test_serve_names_the_expected_field(tiny_run):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from hamengine.engine.serve.server import create_app

    png = encode(Image.new("RGB", (SIZE, SIZE), "red"))
    with TestClient(create_app(tiny_run, device="cpu")) as client:
        other = client.post("/api/predict", files={"file": ("a.png", png, "image/png")})
        text = client.post("/api/predict", data={"image": "a.png"}, files={"note": ("n.txt", b"x", "text/plain")})
        explain = client.post("/api/explain", data={"image": "a.png"}, files={"note": ("n.txt", b"x", "text/plain")})
        ok = client.post("/api/predict", files={"image": ("a.png", png, "image/png")})
    assert ok.status_code == 200, ok.text
    assert other.status_code == 422
    assert "field named 'image'" in other.json()["detail"] and "'file'" in other.json()["detail"]
    for r in (text, explain):  # text under `image`: one sentence naming the field, not a pydantic list
        assert r.status_code == 422 and isinstance(r.json()["detail"], str), r.text
        assert "'image' holds text, not a file" in r.json()["detail"]


# ---------------------------------------------------------------- one DataLoader shutdown

class _Pids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shutdown_workers_stops_persistent_workers_now():
    from hamengine.loaders.kinds.base import shutdown_workers

    dl = torch.utils.data.DataLoader(_Pids(), batch_size=2, num_workers=1, persistent_workers=True)
    pids = {int(p) for batch in dl for p in batch}
    assert pids and os.getpid() not in pids and all(_alive(p) for p in pids)
    shutdown_workers(dl)
    assert not any(_alive(p) for p in pids)
    assert [int(p) for batch in dl for p in batch]  # the DataLoader still works: new workers start
    shutdown_workers(dl)
    shutdown_workers(dl)  # twice is harmless
