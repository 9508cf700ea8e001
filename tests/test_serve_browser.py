"""End to end in a real browser: `hamengine serve` in a subprocess, Debian's headless chromium driven
by Selenium uploads an image through the page's file input; the bars, the top class (equal to
/api/predict's for the same image) and the Grad-CAM overlay must appear. A screenshot is kept as a test
artifact (pytest tmp dir, and $HAMENGINE_ARTIFACTS when set)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
from serve_support import real_or_synthetic_jpeg, serve_subprocess  # noqa: E402

from hamengine.config import CLASS_NAMES, CLASSES  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _driver(profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(CI installs them with .ci/install-browser.sh)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    # Never let Selenium Manager try to download a driver: use the system one.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def image_file(request, tmp_path_factory) -> Path:
    try:
        fullres = request.getfixturevalue("fullres70")
    except pytest.skip.Exception:
        fullres = None
    data, name = real_or_synthetic_jpeg(fullres)
    path = tmp_path_factory.mktemp("upload") / name
    path.write_bytes(data)
    return path


@pytest.mark.slow
def test_upload_in_headless_chromium(request, tmp_path, image_file):
    import httpx

    profile = tmp_path / "chromium-profile"
    driver = _driver(profile)  # skips before the (slow) run is built when there is no browser
    try:
        run = request.getfixturevalue("serve_run")
        with serve_subprocess(run) as url:
            with open(image_file, "rb") as f:
                api = httpx.post(url + "/api/predict", files={"image": (image_file.name, f, "image/jpeg")},
                                 timeout=60).json()
            _drive(driver, url, image_file, api, tmp_path)
    finally:
        driver.quit()


def _drive(driver, url: str, image_file: Path, api: dict, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    assert "not a diagnosis" in driver.find_element(By.ID, "notice").text
    WebDriverWait(driver, 30).until(lambda d: f"model {api['model']}" in d.find_element(By.ID, "model-info").text)
    driver.find_element(By.ID, "file").send_keys(str(image_file.resolve()))
    WebDriverWait(driver, 90).until(lambda d: d.find_element(By.TAG_NAME, "body")
                                    .get_attribute("data-state") in ("done", "error"))
    shot = tmp_path / "serve-page.png"
    driver.save_screenshot(str(shot))
    if os.environ.get("HAMENGINE_ARTIFACTS"):
        dest = Path(os.environ["HAMENGINE_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / shot.name)
    body = driver.find_element(By.TAG_NAME, "body")
    assert body.get_attribute("data-state") == "done", driver.find_element(By.ID, "error").text

    bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert sorted(b.get_attribute("data-dx") for b in bars) == sorted(CLASSES)
    shown = [float(b.find_element(By.CLASS_NAME, "pct").text.rstrip("%")) for b in bars]
    assert shown == sorted(shown, reverse=True), "bars are not sorted by probability"
    for b in bars:  # full names next to the codes
        assert CLASS_NAMES[b.get_attribute("data-dx")] in b.find_element(By.CLASS_NAME, "name").text
    top = driver.find_element(By.ID, "top-class")
    assert top.get_attribute("data-dx") == api["top"]["dx"]
    assert api["top"]["name"] in top.text
    assert f"{100 * api['top']['probability']:.1f}%" in top.text
    overlay_w = driver.execute_script("return document.getElementById('overlay').naturalWidth")
    preview_w = driver.execute_script("return document.getElementById('preview').naturalWidth")
    assert overlay_w > 0 and preview_w > 0, "preview or Grad-CAM overlay did not load"
    assert shot.stat().st_size > 10_000

    # A file that is not an image: the page shows the server's message instead of stale bars.
    bad = tmp_path / "notes.jpg"
    bad.write_text("these are notes, not a JPEG\n" * 20)
    driver.find_element(By.ID, "file").send_keys(str(bad.resolve()))
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body")
                                    .get_attribute("data-state") == "error")
    assert "415" in driver.find_element(By.ID, "error").text
    assert "not an image" in driver.find_element(By.ID, "error").text
    assert not driver.find_elements(By.CSS_SELECTOR, "#bars .bar")


@pytest.mark.slow
def test_metadata_fields_in_headless_chromium(request, tmp_path, image_file):
    """A --meta run's page has age / sex / site inputs; what the page shows for an image with them
    filled in is what /api/predict answers for the same image and fields."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _driver(tmp_path / "chromium-profile")
    try:
        run = request.getfixturevalue("meta_run")
        fields = {"age": "70", "sex": "male", "site": "back"}
        with serve_subprocess(run) as url:
            with open(image_file, "rb") as f:
                api = httpx.post(url + "/api/predict", files={"image": (image_file.name, f, "image/jpeg")},
                                 data=fields, timeout=60).json()
            assert api["metadata_used"] is True
            driver.get(url + "/")
            driver.find_element(By.ID, "meta-age").send_keys(fields["age"])
            Select(driver.find_element(By.ID, "meta-sex")).select_by_value(fields["sex"])
            Select(driver.find_element(By.ID, "meta-site")).select_by_value(fields["site"])
            driver.find_element(By.ID, "file").send_keys(str(image_file.resolve()))
            WebDriverWait(driver, 90).until(lambda d: d.find_element(By.TAG_NAME, "body")
                                            .get_attribute("data-state") in ("done", "error"))
            assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
                driver.find_element(By.ID, "error").text
            top = driver.find_element(By.ID, "top-class")
            assert top.get_attribute("data-dx") == api["top"]["dx"]
            assert f"{100 * api['top']['probability']:.1f}%" in top.text
    finally:
        driver.quit()
