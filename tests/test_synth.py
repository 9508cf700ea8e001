"""Synthetic HAM10000: metadata statistics, determinism, file format, folder safety, CLI, learnability."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from hamengine.cli import cli
from hamengine.config import CLASSES
from hamengine.loaders.ingest.synth import (
    LOCALIZATIONS,
    MASK_DIR,
    METADATA_COLUMNS,
    METADATA_NAME,
    PART_DIRS,
    REAL_COUNTS,
    SynthError,
    class_counts,
    synth_metadata,
    synthesize,
)
from hamengine.loaders.ingest.synth_draw import draw_image

SMALL = (120, 90)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """30 images with masks, drawn in one process."""
    return synthesize(tmp_path_factory.mktemp("s") / "ds", n=30, seed=3, size=SMALL, workers=1,
                      progress=False, masks=True)


# --- metadata ---------------------------------------------------------------------------------

def test_full_size_metadata_matches_ham10000():
    df = synth_metadata(10015, seed=0)
    assert tuple(df.columns) == METADATA_COLUMNS
    assert df["dx"].value_counts().to_dict() == REAL_COUNTS
    assert abs(df["lesion_id"].nunique() - 7470) <= 0.03 * 7470
    # one lesion = one patient's lesion: its class and attributes are shared by all its images
    per_lesion = df.groupby("lesion_id")[["dx", "dx_type", "sex", "localization"]].nunique()
    assert (per_lesion == 1).all().all()
    assert df["image_id"].is_unique
    numbers = df["image_id"].str.slice(5).astype(int)
    assert df["image_id"].str.fullmatch(r"ISIC_\d{7}").all() and df["lesion_id"].str.fullmatch(r"HAM_\d{7}").all()
    assert numbers.min() == 24306 and numbers.max() == 34320
    types = df["dx_type"].value_counts()
    for name, real in {"histo": 5340, "follow_up": 3704, "consensus": 902}.items():
        assert abs(types[name] - real) <= 0.08 * real, (name, types[name])
    assert 30 <= types["confocal"] <= 130
    assert set(df.loc[df["dx_type"] == "follow_up", "dx"]) == {"nv"}
    assert set(df.loc[df["dx"].isin(["mel", "bcc", "akiec"]), "dx_type"]) == {"histo"}
    assert 20 <= df["age"].isna().sum() <= 120
    ages = df["age"].dropna()
    assert ages.between(0, 85).all() and (ages % 5 == 0).all()
    assert df.groupby("dx")["age"].mean()["nv"] < df.groupby("dx")["age"].mean()["bcc"]
    assert set(df["sex"]) == {"male", "female", "unknown"}
    assert set(df["localization"]) <= set(LOCALIZATIONS) and df["localization"].nunique() >= 14
    assert df["localization"].value_counts().index[0] in ("back", "lower extremity")


def test_metadata_is_seeded():
    a, b, c = synth_metadata(500, 1), synth_metadata(500, 1), synth_metadata(500, 2)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


@pytest.mark.parametrize("n", [7, 21, 30, 200, 500, 2000])
def test_every_class_present_for_small_n(n):
    counts = class_counts(n)
    assert sum(counts.values()) == n and set(counts) == set(CLASSES)
    assert min(counts.values()) >= min(3, n // 7)
    assert counts["nv"] == max(counts.values())
    df = synth_metadata(n, 0)
    assert len(df) == n and set(df["dx"]) == set(CLASSES)
    if n >= 200:  # enough lesions per class for lesion-grouped train/val/test splits
        assert df.groupby("dx")["lesion_id"].nunique().min() >= 3


def test_too_small_n_is_refused():
    with pytest.raises(SynthError, match="too small"):
        class_counts(6)


# --- files ------------------------------------------------------------------------------------

def test_layout_and_images(small: Path):
    df = pd.read_csv(small / METADATA_NAME)
    assert list(df.columns) == list(METADATA_COLUMNS) and len(df) == 30
    part1 = sorted(p.stem for p in (small / PART_DIRS[0]).glob("*.jpg"))
    part2 = sorted(p.stem for p in (small / PART_DIRS[1]).glob("*.jpg"))
    assert sorted(part1 + part2) == sorted(df["image_id"]) and len(part1) == 15
    assert max(part1) < min(part2)  # lower ids in part 1, as in HAM10000
    for image_id in df["image_id"]:
        folder = PART_DIRS[0] if image_id in part1 else PART_DIRS[1]
        raw = (small / folder / f"{image_id}.jpg").read_bytes()
        assert raw[:2] == b"\xff\xd8" and b"\xff\xc0" in raw and b"\xff\xc2" not in raw  # baseline SOF0
        img = Image.open(io.BytesIO(raw))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == SMALL
        assert not img.info.get("progressive")
        mask = np.asarray(Image.open(small / MASK_DIR / f"{image_id}_mask.png"))
        assert mask.shape == (SMALL[1], SMALL[0]) and set(np.unique(mask)) <= {0, 255}
        inside = mask > 0
        assert 0.03 < inside.mean() < 0.75, (image_id, inside.mean())  # localized, not the whole frame
        # the lesion stands out from the skin: a typical pixel inside the mask is farther from the
        # typical skin colour than a typical skin pixel (skin: the brighter half of the outside, which
        # leaves out the dermatoscope's dark rim and hairs; medians are robust to the rest)
        pix = np.asarray(img.convert("RGB"), np.float32)
        luma = pix.sum(-1)
        skin = ~inside & (luma >= np.median(luma[~inside]))
        dist = np.abs(pix - np.median(pix[skin], axis=0)).sum(-1)
        assert np.median(dist[inside]) > np.median(dist[skin]) + 20, image_id


def test_ingests_as_kaggle_layout(small: Path):
    """The real consumer: source ingest reads the output as a HAM10000 Kaggle download."""
    from hamengine.loaders.ingest.sources import Layout, load_source

    table = load_source(small)
    assert table.layout == Layout.KAGGLE and len(table.df) == 30 and not table.missing
    meta = pd.read_csv(small / METADATA_NAME).sort_values("image_id").reset_index(drop=True)
    assert list(table.df["image_id"]) == list(meta["image_id"])
    assert list(table.df["dx"]) == list(meta["dx"]) and list(table.df["lesion_id"]) == list(meta["lesion_id"])


def test_same_seed_same_bytes_any_workers(small: Path, tmp_path: Path):
    two = synthesize(tmp_path / "w2", n=30, seed=3, size=SMALL, workers=2, progress=False, masks=True)
    assert _files(two) == _files(small)
    other = synthesize(tmp_path / "s4", n=30, seed=4, size=SMALL, workers=1, progress=False)
    a, b = _files(small), _files(other)
    assert a[METADATA_NAME] != b[METADATA_NAME]
    jpg = [k for k in b if k.endswith(".jpg")]
    assert sum(a.get(k) != b[k] for k in jpg) == len(jpg)


def test_views_of_one_lesion_differ(small: Path):
    df = pd.read_csv(small / METADATA_NAME)
    multi = df.groupby("lesion_id").filter(lambda g: len(g) > 1).iloc[0]
    same = df[df["lesion_id"] == multi["lesion_id"]]
    n0, n1 = (int(i[5:]) for i in same["image_id"][:2])
    lesion = int(multi["lesion_id"][4:])
    a, _ = draw_image(multi["dx"], 3, lesion, n0, SMALL)
    b, _ = draw_image(multi["dx"], 3, lesion, n1, SMALL)
    assert a != b


def test_refuses_foreign_folder_resumes_own(tmp_path: Path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SynthError, match="--force"):
        synthesize(foreign, n=10, size=SMALL, workers=1, progress=False)
    synthesize(foreign, n=10, size=SMALL, workers=1, progress=False, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"  # --force replaces only synth's files

    out = synthesize(tmp_path / "own", n=12, seed=1, size=SMALL, workers=1, progress=False)
    before = _files(out)
    with pytest.raises(SynthError, match="other options"):
        synthesize(out, n=12, seed=2, size=SMALL, workers=1, progress=False)
    # an interrupted run: no metadata yet, one image missing -> resumed to the same bytes
    (out / METADATA_NAME).unlink()
    victim = next((out / PART_DIRS[0]).glob("*.jpg"))
    victim.unlink()
    synthesize(out, n=12, seed=1, size=SMALL, workers=1, progress=False)
    assert _files(out) == before
    synthesize(out, n=12, seed=2, size=SMALL, workers=1, progress=False, force=True)
    assert _files(out)[METADATA_NAME] != before[METADATA_NAME]


# --- command line -----------------------------------------------------------------------------

def test_cli_help():
    result = CliRunner().invoke(cli, ["synth", "--help"])
    assert result.exit_code == 0
    for opt in ("--out", "--n", "--seed", "--size", "--workers", "--masks", "--force", "--json"):
        assert opt in result.output


def test_cli_run_and_errors(tmp_path: Path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["synth", "--out", str(out), "--n", "30", "--size", "120x90",
                                      "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 30 and set(summary["classes"]) == set(CLASSES)
    assert all(v >= 3 for v in summary["classes"].values())
    assert len(list(out.rglob("*.jpg"))) == 30
    bad = CliRunner().invoke(cli, ["synth", "--out", str(out), "--n", "31", "--size", "120x90"])
    assert bad.exit_code != 0 and "--force" in bad.output
    bad_size = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path / "x"), "--size", "600by450"])
    assert bad_size.exit_code != 0 and "WIDTHxHEIGHT" in bad_size.output


# --- the classes are learnable but overlap ---------------------------------------------------

@pytest.mark.slow  # synthesizes and scores 392 images: ~12 s
def test_colour_histograms_separate_classes_imperfectly():
    """A colour histogram + logistic regression beats chance (1/7) clearly but is not perfect."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    per_class = 56
    feats, labels = [], []
    for i in range(per_class * len(CLASSES)):
        c = i % len(CLASSES)
        jpg, _ = draw_image(CLASSES[c], 11, 50_000 + i, 50_000 + i, (200, 150))
        px = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB").reduce(2)) // 32  # 8 levels
        hist = np.bincount((px[..., 0] * 64 + px[..., 1] * 8 + px[..., 2]).ravel(), minlength=512)
        feats.append(np.sqrt(hist / hist.sum()))
        labels.append(c)
    x, y = np.asarray(feats), np.asarray(labels)
    pred = cross_val_predict(LogisticRegression(C=3, max_iter=500), x, y,
                             cv=StratifiedKFold(4, shuffle=True, random_state=0))
    bacc = balanced_accuracy_score(y, pred)
    assert 0.4 < bacc < 0.97, bacc


def test_realism_real_weighs_like_the_originals_and_light_is_unchanged(tmp_path):
    """--realism real: quality 100, 4:4:4, faint grain -> about HAM10000's ~270 KB at 600x450; the
    light default is byte-identical with or without the option (same drawing, own grain generator)."""
    from hamengine.loaders.ingest.synth import synth_summary, synthesize
    from hamengine.loaders.ingest.synth_draw import draw_image

    light, _ = draw_image("mel", 0, 3, 3, (600, 450))
    assert draw_image("mel", 0, 3, 3, (600, 450), realism="light")[0] == light
    real, _ = draw_image("mel", 0, 3, 3, (600, 450), realism="real")
    assert draw_image("mel", 0, 3, 3, (600, 450), realism="real")[0] == real  # deterministic
    assert 150_000 < len(real) < 450_000 and len(light) < 80_000
    im = Image.open(io.BytesIO(real))
    assert set(im.quantization[0]) == {1} and im.layer[0][1:3] == im.layer[1][1:3] == (1, 1)  # q100, 4:4:4
    a = np.asarray(Image.open(io.BytesIO(light)), np.float32)
    b = np.asarray(im, np.float32)
    assert np.abs(a - b).mean() < 6  # the same picture under the grain and the encoder
    out = synthesize(tmp_path / "s", n=20, seed=1, size=(600, 450), workers=1, progress=False, realism="real")
    s = synth_summary(out)
    assert s["realism"] == "real" and 150_000 < s["mean_jpeg_bytes"] < 450_000
    with pytest.raises(Exception, match="realism"):
        synthesize(tmp_path / "t", n=20, realism="heavy", progress=False)
