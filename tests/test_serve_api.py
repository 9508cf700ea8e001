"""`hamengine serve` JSON API on a real trained run: predictions equal the Predictor's, and every upload
error gets the right status with a message."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
pytest.importorskip("multipart", reason="the 'serve' extra (python-multipart) is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from serve_support import RUN_SIZE, bomb_png, real_or_synthetic_jpeg, to_png  # noqa: E402

from hamengine.config import CLASS_NAMES, CLASSES  # noqa: E402
from hamengine.engine.serve.server import ServeLimits, create_app  # noqa: E402

MAX_UPLOAD = 2 * 1024 * 1024
LIMITS = ServeLimits(max_upload_bytes=MAX_UPLOAD, max_pixels=4_000_000, max_batch=4, max_wait_ms=50)


@pytest.fixture(scope="module")
def client(serve_run):
    with TestClient(create_app(serve_run, device="cpu", limits=LIMITS)) as c:
        yield c


@pytest.fixture(scope="module")
def jpeg(request) -> bytes:
    try:
        fullres = request.getfixturevalue("fullres70")
    except pytest.skip.Exception:
        fullres = None
    return real_or_synthetic_jpeg(fullres)[0]


def _post(client, data: bytes, name="lesion.jpg", ctype="image/jpeg", field="image", route="predict"):
    return client.post(f"/api/{route}", files={field: (name, data, ctype)})


def _tree_state(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_predict_matches_predictor(client, serve_run, jpeg):
    from hamengine.engine.evaluate.predict import Predictor

    r = _post(client, jpeg)
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["probabilities"]) == list(CLASSES)
    probs = np.array([body["probabilities"][c] for c in CLASSES])
    assert np.all(probs >= 0) and abs(probs.sum() - 1) < 1e-5
    top = CLASSES[int(probs.argmax())]
    assert body["top"] == {"dx": top, "name": CLASS_NAMES[top], "probability": pytest.approx(probs.max())}
    assert body["latency_ms"] > 0 and body["model"] == "hamnet"
    # The same image through the library's Predictor gives the same probabilities.
    expected = np.asarray(Predictor(serve_run, device="cpu").probabilities([Image.open(io.BytesIO(jpeg))]))[0]
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_png_and_other_modes_accepted(client, jpeg):
    ref = _post(client, jpeg).json()["probabilities"]
    png = _post(client, to_png(jpeg), name="lesion.png", ctype="image/png")
    assert png.status_code == 200, png.text
    # A PNG of the decoded JPEG carries the same pixels, so the same prediction.
    for dx in CLASSES:
        assert png.json()["probabilities"][dx] == pytest.approx(ref[dx], abs=1e-6)
    for mode in ("RGBA", "L"):
        r = _post(client, to_png(jpeg, mode), name=f"{mode}.png", ctype="image/png")
        assert r.status_code == 200, (mode, r.text)


def test_exif_orientation_applied(client, jpeg):
    """A camera JPEG stored sideways with EXIF orientation 6 is seen upright, like the same picture
    stored upright (the upload keeps its EXIF up to the Predictor's preprocessing)."""
    upright = Image.open(io.BytesIO(jpeg)).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 undoes this rotation
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"tagged": (stored, exif), "upright": (upright, None), "sideways": (stored, None)}
    overlays, probs = {}, {}
    for name, (im, tags) in files.items():
        buf = io.BytesIO()
        im.save(buf, format="PNG", **({"exif": tags} if tags else {}))
        probs[name] = _post(client, buf.getvalue(), f"{name}.png", "image/png").json()["probabilities"]
        r = _post(client, buf.getvalue(), f"{name}.png", "image/png", route="explain")
        overlays[name] = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)
    # The overlay shows the crop the model saw: identical for tagged and upright, not for sideways.
    assert np.abs(overlays["tagged"] - overlays["upright"]).max() <= 1
    assert np.abs(overlays["sideways"] - overlays["upright"]).mean() > 5
    for dx in CLASSES:
        assert probs["tagged"][dx] == pytest.approx(probs["upright"][dx], abs=1e-6)


def test_explain_returns_overlay_png(client, jpeg):
    top = _post(client, jpeg).json()["top"]["dx"]
    r = _post(client, jpeg, route="explain")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-class"] == top
    overlay = Image.open(io.BytesIO(r.content))
    assert overlay.format == "PNG" and min(overlay.size) >= 32
    assert np.asarray(overlay.convert("RGB")).std() > 1  # not a blank image
    chosen = client.post("/api/explain?dx=mel", files={"image": ("a.jpg", jpeg, "image/jpeg")})
    assert chosen.status_code == 200 and chosen.headers["x-class"] == "mel"
    bad = client.post("/api/explain?dx=cat", files={"image": ("a.jpg", jpeg, "image/jpeg")})
    assert bad.status_code == 422 and "cat" in bad.json()["detail"]


def test_health_and_model(client, serve_run):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    info = client.get("/api/model").json()
    assert [c["dx"] for c in info["classes"]] == list(CLASSES)
    assert [c["name"] for c in info["classes"]] == [CLASS_NAMES[c] for c in CLASSES]
    assert info["input_size"] == RUN_SIZE and info["model"] == "hamnet" and info["run"] == serve_run.name
    metrics_file = serve_run / "eval-test" / "metrics.json"
    if metrics_file.is_file():  # the same numbers (NaN, which strict JSON lacks, as null)
        expected = json.loads(metrics_file.read_text(), parse_constant=lambda _: None)
        assert info["test_metrics"] == expected and "balanced_accuracy" in expected
    else:
        assert info["test_metrics"] is None


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "not a diagnosis" in page and 'id="file"' in page and 'id="bars"' in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline
    for name in CLASS_NAMES.values():
        assert json.dumps(name)[1:-1] in page


@pytest.mark.parametrize("case", ["content_length", "chunked", "file_part"])
def test_too_large_is_413(client, case):
    big = b"\xff\xd8" + b"\0" * (MAX_UPLOAD + 100 * 1024)
    if case == "content_length":
        r = _post(client, big)
    elif case == "chunked":  # no Content-Length: the server must count the bytes it reads
        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
            for i in range(0, len(big), 256 * 1024):
                yield big[i:i + 256 * 1024]
        r = client.post("/api/predict", content=chunks(),
                        headers={"content-type": "multipart/form-data; boundary=b"})
        assert "content-length" not in r.request.headers
    else:  # body within the multipart allowance, file itself over the limit
        r = _post(client, b"\xff\xd8" + b"\0" * (MAX_UPLOAD + 10))
    assert r.status_code == 413, r.text
    assert "too large" in r.json()["detail"] and "2 MiB" in r.json()["detail"]


def test_upload_errors(client, jpeg):
    cases = {
        "not an image": (_post(client, b"hello, I am text" * 10, "a.txt", "text/plain"), 415, "not an image"),
        "empty": (_post(client, b""), 422, "empty"),
        "truncated": (_post(client, jpeg[: len(jpeg) // 2]), 422, "truncated"),
        "wrong field": (_post(client, jpeg, field="file"), 422, "'image'"),
        "not multipart": (client.post("/api/predict", content=jpeg, headers={"content-type": "image/jpeg"}),
                          415, "multipart/form-data"),
        "bomb dimensions": (_post(client, bomb_png(3000, 2000), "bomb.png", "image/png"), 413, "pixels"),
        "bomb over PIL's limit": (_post(client, bomb_png(20000, 20000), "bomb.png", "image/png"), 413, ""),
        "corrupt header": (_post(client, b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "x.png", "image/png"), None, ""),
    }
    for what, (r, status, words) in cases.items():
        if status is None:  # PIL may call a broken header unidentifiable (415) or corrupt (422)
            assert r.status_code in (415, 422), (what, r.status_code, r.text)
        else:
            assert r.status_code == status, (what, r.status_code, r.text)
        assert isinstance(r.json()["detail"], (str, list)) and r.json()["detail"], what
        assert words in str(r.json()["detail"]), (what, r.json())
    assert client.get("/api/health").json()["status"] == "ok"  # the errors did not hurt the model


def test_concurrent_requests_batched_and_equal(serve_run, jpeg):
    limits = ServeLimits(max_upload_bytes=MAX_UPLOAD, max_batch=4, max_wait_ms=1000)
    images = [jpeg, to_png(jpeg, "L")]
    with TestClient(create_app(serve_run, device="cpu", limits=limits)) as c:
        single = [_post(c, im).json()["probabilities"] for im in images]
        before = c.get("/api/health").json()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _post(c, images[i % 2]), range(8)))
        after = c.get("/api/health").json()
    for i, r in enumerate(results):
        assert r.status_code == 200, r.text
        for dx in CLASSES:  # a micro-batched forward gives each image its own answer
            assert r.json()["probabilities"][dx] == pytest.approx(single[i % 2][dx], abs=1e-5)
    assert after["images"] - before["images"] == 8
    assert after["batches"] - before["batches"] < 8  # requests shared forward passes


def test_serving_writes_nothing_into_the_run(serve_run, jpeg):
    before = _tree_state(serve_run)
    with TestClient(create_app(serve_run, device="cpu", limits=LIMITS)) as c:
        assert _post(c, jpeg).status_code == 200
        assert _post(c, jpeg, route="explain").status_code == 200
    assert _tree_state(serve_run) == before


def test_cli_rejects_a_folder_without_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hamengine", "serve", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    # no config.json: the run's own checkpoint cannot be known, and the message says what RUN must be
    assert out.returncode != 0 and "config.json" in out.stderr and "made by `hamengine train`" in out.stderr
    # a run judged by its last weights, without them: the message names the file it looked for
    (tmp_path / "config.json").write_text('{"model": "hamnet", "checkpoint": "last"}')
    out = subprocess.run([sys.executable, "-m", "hamengine", "serve", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "checkpoints/last.pt" in out.stderr


def test_loopback_detection():
    from hamengine.commands.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


@pytest.mark.slow
def test_bench_serve_json(serve_run):
    out = subprocess.run([sys.executable, "-m", "hamengine", "bench", "serve", str(serve_run), "--requests",
                          "12", "--concurrency", "1,4", "--warmup", "2", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert [r["concurrency"] for r in report["results"]] == [1, 4]
    for r in report["results"]:
        assert r["ok"] == 12 and r["errors"] == 0 and r["req_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert report["hardware"]["cpus"] >= 1 and report["model"] == "hamnet"
