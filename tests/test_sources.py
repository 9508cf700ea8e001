"""Source ingest: every layout, real fixtures rearranged into every layout, every bad-input case."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hamengine.config import CLASSES, ISIC_COLUMNS
from hamengine.loaders.ingest.layouts import COLUMNS, ISIC_CONFIRM
from hamengine.loaders.ingest.sources import Layout, SourceError, load_source, read_image_bytes

META_COLS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
CONFIRM_OF = {v: k for k, v in ISIC_CONFIRM.items()}  # our dx_type -> ISIC diagnosis_confirm_type
CORE = ["image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization", "split"]


# ------------------------------------------------------------------------------------------- builders
def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path, quality=80)


def _synthetic(root: Path, n: int = 28) -> Path:
    """A small Kaggle-layout download: every class, lesions with 1-2 images, some ages missing."""
    rows = []
    for i in range(n):
        rows.append({"lesion_id": f"HAM_{i // 2:07d}", "image_id": f"ISIC_{i:07d}",
                     "dx": CLASSES[(i // 2) % len(CLASSES)], "dx_type": ["histo", "follow_up", "consensus",
                                                                         "confocal"][i % 4],
                     "age": "" if i % 9 == 4 else float(30 + i), "sex": ["male", "female", "unknown"][i % 3],
                     "localization": ["back", "lower extremity", "face"][i % 3]})
    root.mkdir(parents=True)
    pd.DataFrame(rows, columns=META_COLS).to_csv(root / "HAM10000_metadata.csv", index=False)
    for i, r in enumerate(rows):
        part = root / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        _jpeg(part / f"{r['image_id']}.jpg", i)
    (root / "hmnist_8_8_RGB.csv").write_text("pixel0000,label\n1,2\n")  # must be ignored
    return root


def _link(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def _meta(df: pd.DataFrame) -> pd.DataFrame:
    out = df[META_COLS].copy()
    out["age"] = out["age"].map(lambda a: "" if pd.isna(a) else a)
    return out


def to_kaggle(df: pd.DataFrame, dst: Path, lower: bool = False, duplicate: bool = False) -> Path:
    meta = "ham10000_metadata.csv" if lower else "HAM10000_metadata.csv"
    dst.mkdir(parents=True)
    _meta(df).to_csv(dst / meta, index=False)
    for i, (iid, img) in enumerate(zip(df.image_id, df.image, strict=True)):
        folder = f"{'ham' if lower else 'HAM'}10000_images_part_{1 + i % 2}"
        _link(img, dst / folder / f"{iid}.jpg")
        if duplicate:  # Kaggle downloads sometimes carry a second, lower-case copy of each folder
            _link(img, dst / folder.lower() / folder.lower() / f"{iid}.jpg")
    return dst


def to_dataverse(df: pd.DataFrame, dst: Path, ext: str = ".tab", zipped: bool = True) -> Path:
    dst.mkdir(parents=True)
    meta = _meta(df)
    meta["dataset"] = ["vidir_modern", "rosendahl", "vienna_dias"] * (len(df) // 3) + ["vidir_molemax"] * (len(df) % 3)
    meta["age"] = meta["age"].replace("", "NA")  # as an R / Dataverse export writes a missing age
    meta.to_csv(dst / f"HAM10000_metadata{ext}", index=False, sep="\t", quoting=csv.QUOTE_NONNUMERIC)
    halves = {1: df.iloc[::2], 2: df.iloc[1::2]}
    for part, rows in halves.items():
        if zipped:
            with zipfile.ZipFile(dst / f"HAM10000_images_part_{part}.zip", "w") as zf:
                for iid, img in zip(rows.image_id, rows.image, strict=True):
                    zf.write(img, f"{iid}.jpg")
        else:
            for iid, img in zip(rows.image_id, rows.image, strict=True):
                _link(img, dst / f"HAM10000_images_part_{part}" / f"{iid}.jpg")
    return dst


def _onehot(df: pd.DataFrame, weight: bool = False) -> pd.DataFrame:
    gt = pd.DataFrame({"image": df.image_id.to_numpy()})
    for c in ISIC_COLUMNS:
        gt[c] = (df.dx.to_numpy() == c.lower()).astype(float)
    if weight:
        gt["score_weight"] = 1.0
    return gt


def to_isic(df: pd.DataFrame, dst: Path, val: pd.DataFrame | None = None, test: pd.DataFrame | None = None) -> Path:
    dst.mkdir(parents=True)
    _onehot(df).to_csv(dst / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": df.image_id, "lesion_id": df.lesion_id,
                  "diagnosis_confirm_type": df.dx_type.map(CONFIRM_OF)}).to_csv(
        dst / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    for split, rows in (("Training", df), ("Validation", val), ("Test", test)):
        if rows is None:
            continue
        if split != "Training":
            _onehot(rows, weight=split == "Test").to_csv(dst / f"ISIC2018_Task3_{split}_GroundTruth.csv", index=False)
        for iid, img in zip(rows.image_id, rows.image, strict=True):
            _link(img, dst / f"ISIC2018_Task3_{split}_Input" / f"{iid}.jpg")
    (dst / "ISIC2018_Task3_Training_Input" / "LICENSE.txt").write_text("CC BY-NC\n")
    return dst


def to_own(df: pd.DataFrame, dst: Path, image_column: bool = False) -> Path:
    dst.mkdir(parents=True)
    meta = _meta(df)[["image_id", "dx", "lesion_id", "age", "sex", "localization", "dx_type"]]
    meta["notes"] = "x"  # extra columns are allowed
    for i, (iid, img) in enumerate(zip(df.image_id, df.image, strict=True)):
        _link(img, dst / "pictures" / f"batch{i % 3}" / f"{iid}.jpg")
    if image_column:
        meta["image"] = [f"pictures/batch{i % 3}/{iid}.jpg" for i, iid in enumerate(df.image_id)]
    meta.to_csv(dst / "metadata.csv", index=False)
    return dst


def _core(df: pd.DataFrame) -> pd.DataFrame:
    return df[CORE].reset_index(drop=True)


def _problems(root: Path, allow_missing: bool = False) -> tuple[SourceError, str]:
    with pytest.raises(SourceError) as e:
        load_source(root, allow_missing=allow_missing)
    return e.value, str(e.value)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return _synthetic(tmp_path_factory.mktemp("synth") / "kaggle")


# -------------------------------------------------------------------------------------- good layouts
def _reference_counts(root: Path) -> dict[str, int]:
    with open(root / "HAM10000_metadata.csv", newline="") as f:
        dx = [r["dx"] for r in csv.DictReader(f)]
    return {c: dx.count(c) for c in CLASSES}


def _check_table(st, root: Path) -> None:
    df = st.df
    assert list(df.columns) == list(COLUMNS)
    assert df.image_id.is_monotonic_increasing and df.image_id.is_unique
    assert list(df.index) == list(range(len(df)))
    assert df.dx.isin(CLASSES).all() and df.age.dtype == np.float64
    assert df.image.notna().all() and st.missing == []
    assert {c: int((df.dx == c).sum()) for c in CLASSES} == _reference_counts(root)


def test_real_fixtures_ingest(dev200, fullres70):
    dev = load_source(dev200)
    assert dev.layout == Layout.KAGGLE and len(dev.df) == 3011
    _check_table(dev, dev200)
    assert {c: int((dev.df.dx == c).sum()) for c in CLASSES} == {
        "akiec": 100, "bcc": 155, "bkl": 330, "df": 36, "mel": 335, "nv": 2012, "vasc": 43}
    ref = pd.read_csv(dev200 / "HAM10000_metadata.csv").sort_values("image_id").reset_index(drop=True)
    assert (dev.df.lesion_id == ref.lesion_id).all() and (dev.df.dx_type == ref.dx_type).all()
    assert np.array_equal(dev.df.age.isna(), ref.age.isna())
    assert np.allclose(dev.df.age.dropna(), ref.age.dropna())
    assert dev.metadata_sha256 == hashlib.sha256((dev200 / "HAM10000_metadata.csv").read_bytes()).hexdigest()
    full = load_source(fullres70)
    assert len(full.df) == 70
    _check_table(full, fullres70)
    assert read_image_bytes(full.df.image[0])[:2] == b"\xff\xd8"


@pytest.mark.parametrize("fixture", ["synth", "dev200", "fullres70"])
def test_every_layout_gives_the_same_table(fixture, request, tmp_path):
    root = request.getfixturevalue(fixture)
    base = load_source(root)
    df = base.df
    variants = {
        "kaggle-lower-dup": (to_kaggle(df, tmp_path / "k", lower=True, duplicate=True), Layout.KAGGLE),
        "dataverse-zip": (to_dataverse(df, tmp_path / "dz"), Layout.DATAVERSE),
        "dataverse-noext": (to_dataverse(df, tmp_path / "dn", ext="", zipped=False), Layout.DATAVERSE),
        "own": (to_own(df, tmp_path / "o"), Layout.OWN),
        "own-image-col": (to_own(df, tmp_path / "oi", image_column=True), Layout.OWN),
    }
    for name, (path, layout) in variants.items():
        st = load_source(path)
        assert st.layout == layout, name
        pd.testing.assert_frame_equal(_core(st.df), _core(df), obj=name)
        assert st.df.image.notna().all() and not st.missing
    dv = load_source(tmp_path / "dz")
    assert dv.df.image.str.startswith("zip://").all()
    assert dv.df.dataset.notna().all() and set(dv.df.dataset) <= {"vidir_modern", "rosendahl", "vienna_dias",
                                                                    "vidir_molemax"}
    for ref, orig in zip(dv.df.image[:5], df.image[:5], strict=True):  # zip refs read the original bytes
        assert read_image_bytes(ref) == Path(orig).read_bytes()
    isic = load_source(to_isic(df, tmp_path / "i"))
    assert isic.layout == Layout.ISIC2018 and len(isic.metadata_files) == 2
    cols = ["image_id", "lesion_id", "dx", "dx_type"]
    pd.testing.assert_frame_equal(isic.df[cols], df[cols])
    assert isic.df.age.isna().all() and isic.df.sex.isna().all() and isic.df.split.isna().all()


def test_isic_validation_and_test_splits(synth, tmp_path):
    df = load_source(synth).df
    train, val, test = df.iloc[:18], df.iloc[18:23], df.iloc[23:]
    root = to_isic(train, tmp_path / "isic", val=val, test=test)
    gt = pd.read_csv(root / "ISIC2018_Task3_Test_GroundTruth.csv")  # weight-0 row without an image
    extra = {"image": "ISIC_9999999", **{c: float(c == "NV") for c in ISIC_COLUMNS}, "score_weight": 0.0}
    pd.concat([gt, pd.DataFrame([extra])]).to_csv(root / "ISIC2018_Task3_Test_GroundTruth.csv", index=False)
    st = load_source(root)
    assert len(st.df) == len(df) and st.missing == [] and st.skipped[0].startswith("ISIC_9999999")
    assert len(st.metadata_files) == 4
    by = st.df.set_index("image_id")
    assert (by.loc[val.image_id, "split"] == "val").all() and (by.loc[test.image_id, "split"] == "test").all()
    assert by.loc[train.image_id, "split"].isna().all()
    held = by.loc[list(val.image_id) + list(test.image_id)]
    assert (held.index == held.lesion_id).all()  # no groupings for held-out rows: one lesion per image
    assert (by.dx == df.set_index("image_id").dx).all()


def test_isic_images_inside_zip(synth, tmp_path):
    df = load_source(synth).df
    root = to_isic(df, tmp_path / "isic")
    shutil.rmtree(root / "ISIC2018_Task3_Training_Input")
    with zipfile.ZipFile(root / "ISIC2018_Task3_Training_Input.zip", "w") as zf:
        for iid, img in zip(df.image_id, df.image, strict=True):
            zf.write(img, f"ISIC2018_Task3_Training_Input/{iid}.jpg")
        zf.writestr("__MACOSX/ISIC2018_Task3_Training_Input/._ISIC_0000000.jpg", b"junk")
    st = load_source(root)
    assert all(ref.endswith(f".zip!ISIC2018_Task3_Training_Input/{iid}.jpg")
               for ref, iid in zip(st.df.image, st.df.image_id, strict=True))
    assert read_image_bytes(st.df.image[3]) == Path(df.image[3]).read_bytes()


def test_read_image_bytes_file_and_zip(tmp_path):
    _jpeg(tmp_path / "a.jpg", 1)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        zf.write(tmp_path / "a.jpg", "dir/a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    assert read_image_bytes(str(tmp_path / "a.jpg")) == data
    assert read_image_bytes(f"zip://{tmp_path / 'imgs.zip'}!dir/a.jpg") == data
    assert Image.open(io.BytesIO(read_image_bytes(f"zip://{tmp_path / 'imgs.zip'}!dir/a.jpg"))).size == (16, 12)
    with pytest.raises(KeyError):
        read_image_bytes(f"zip://{tmp_path / 'imgs.zip'}!nope.jpg")


# ---------------------------------------------------------------------------------------- bad inputs
def _broken_copy(synth: Path, dst: Path) -> tuple[Path, dict[str, int]]:
    """Kaggle copy with planted problems; returns the 1-based data row of each."""
    shutil.copytree(synth, dst)
    text = (dst / "HAM10000_metadata.csv").read_text().splitlines()
    header, rows = text[0], [r.split(",") for r in text[1:]]
    planted = {"unknown dx": 2, "duplicate": 6, "missing image": 9, "../x": 11, "a/b": 12, "a b": 13,
               "a.b": 14, "control": 15, "non-utf8": 19, "fields": 20,
               "": 22, "..": 23}
    rows[planted["unknown dx"] - 1][2] = "Melanoma"
    rows[planted["duplicate"] - 1][1] = rows[2][1]  # same image_id as data row 3
    missing_id = rows[planted["missing image"] - 1][1]
    next(dst.rglob(f"{missing_id}.jpg")).unlink()
    for key in ("../x", "a/b", "a b", "a.b", "", ".."):
        rows[planted[key] - 1][1] = key
    rows[planted["control"] - 1][1] = "ISIC\x01x"
    rows[planted["fields"] - 1].append("surplus")
    lines = [header.encode()] + [",".join(r).encode() for r in rows]
    lines[planted["non-utf8"]] = lines[planted["non-utf8"]].replace(b"back", b"r\xe9gion")
    (dst / "HAM10000_metadata.csv").write_bytes(b"\n".join(lines) + b"\n")
    return dst, planted


def test_broken_copy_lists_every_problem(synth, tmp_path):
    root, planted = _broken_copy(synth, tmp_path / "broken")
    err, msg = _problems(root)
    rows = {k: f"HAM10000_metadata.csv row {r} (line {r + 1})" for k, r in planted.items()}
    expect = {
        "unknown dx": "unknown dx 'Melanoma'", "duplicate": "duplicate image_id 'ISIC_0000002' (first at",
        "missing image": "not found", "../x": "contains a path separator", "a/b": "contains a path separator",
        "a b": "contains a space", "a.b": "contains a dot", "control": "contains a control character",
        "non-utf8": "is not UTF-8 text: byte 0xe9 at byte offset", "fields": "has 8 fields, the header has 7",
        "": "image_id '' is not a plain name: it is empty", "..": "image_id '..' is not a plain name: it contains '..'",
    }
    for key, text in expect.items():
        hits = [p for p in err.problems if p.startswith(rows[key] + ":") and text in p]
        assert len(hits) == 1, (key, msg)
    assert len(err.problems) == len(expect), msg
    assert "--allow-missing" in msg and all(p in msg for p in err.problems)
    # the missing image alone is tolerated with allow_missing; the other problems still are not
    err2, _ = _problems(root, allow_missing=True)
    assert len(err2.problems) == len(expect) - 1 and not any("not found" in p for p in err2.problems)


def test_allow_missing(synth, tmp_path):
    root = shutil.copytree(synth, tmp_path / "k")
    gone = ["ISIC_0000003", "ISIC_0000010"]
    for iid in gone:
        next(root.rglob(f"{iid}.jpg")).unlink()
    err, msg = _problems(root)
    assert len(err.problems) == 2 and "row 4 (line 5)" in msg and "row 11 (line 12)" in msg
    st = load_source(root, allow_missing=True)
    assert st.missing == gone and len(st.df) == 26 and not st.df.image_id.isin(gone).any()


def test_missing_columns_empty_and_header_only(synth, tmp_path):
    root = shutil.copytree(synth, tmp_path / "k")
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    meta.drop(columns=["dx", "lesion_id"]).to_csv(root / "HAM10000_metadata.csv", index=False)
    err, msg = _problems(root)
    assert err.problems == ["HAM10000_metadata.csv: lacks required column(s) lesion_id, dx (header has: "
                            "image_id, dx_type, age, sex, localization)"], msg
    (root / "HAM10000_metadata.csv").write_bytes(b"")
    assert "HAM10000_metadata.csv: is empty" in _problems(root)[1]
    (root / "HAM10000_metadata.csv").write_text(",".join(META_COLS) + "\n\n")
    assert "HAM10000_metadata.csv: has a header but no data rows" in _problems(root)[1]


def test_own_layout_problems(synth, tmp_path):
    df = load_source(synth).df
    root = to_own(df, tmp_path / "own", image_column=True)
    meta = pd.read_csv(root / "metadata.csv", keep_default_na=False)
    meta.loc[1, "image"] = "pictures/nowhere.jpg"
    meta.loc[4, "dx"] = "NV"  # any case accepted
    meta.loc[5, "lesion_id"] = ""
    meta.loc[6, "age"] = "old"
    meta.loc[7, "image_id"] = meta.loc[7, "image_id"] + ".jpg"
    meta.to_csv(root / "metadata.csv", index=False)
    err, msg = _problems(root)
    assert len(err.problems) == 4, msg
    assert "metadata.csv row 8 (line 9): image_id 'ISIC_0000007.jpg' is not a plain name: it contains a dot " \
           "(give the id without the file extension: 'ISIC_0000007')" in msg
    assert "metadata.csv row 2 (line 3): image file 'pictures/nowhere.jpg' not found" in msg
    assert "metadata.csv row 6 (line 7): lesion_id is empty" in msg
    assert "metadata.csv row 7 (line 8): age 'old' is not a number" in msg


def test_isic_problems(synth, tmp_path):
    df = load_source(synth).df
    root = to_isic(df.iloc[:20], tmp_path / "isic", val=df.iloc[20:])
    gt = pd.read_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv")
    gt.loc[0, "NV"] = 1.0 - gt.loc[0, "NV"]  # flips to two ones or zero ones
    gt.loc[1, ISIC_COLUMNS] = 0.0
    gt.loc[2, "MEL"] = 0.5
    gt.to_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    val = pd.read_csv(root / "ISIC2018_Task3_Validation_GroundTruth.csv")
    val.loc[0, "image"] = df.image_id[5]  # also a training image
    val.to_csv(root / "ISIC2018_Task3_Validation_GroundTruth.csv", index=False)
    err, msg = _problems(root)
    gtname = "ISIC2018_Task3_Training_GroundTruth.csv"
    assert f"{gtname} row 1 (line 2): one-hot row has" in msg
    assert f"{gtname} row 2 (line 3): one-hot row has 0 ones (none)" in msg
    assert f"{gtname} row 3 (line 4): one-hot values must be 0 or 1, got MEL=" in msg
    assert f"ISIC2018_Task3_Validation_GroundTruth.csv row 1 (line 2): duplicate image_id '{df.image_id[5]}'" in msg
    assert "Validation_GroundTruth.csv row 1 (line 2): image ISIC_0000005.jpg not found in ISIC2018_Task3_Validation_Input/" in msg
    assert len(err.problems) == 5, msg
    (root / "ISIC2018_Task3_Training_LesionGroupings.csv").unlink()
    assert "needs isic2018_task3_training_lesiongroupings.csv beside it" in _problems(root)[1].lower()


def test_no_layout_and_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "hmnist_28_28_L.csv").write_text("pixel0000,label\n1,2\n")
    err, msg = _problems(tmp_path / "empty")
    assert "HAM10000_metadata.csv" in msg and "ISIC2018_Task3_Training_GroundTruth.csv" in msg
    assert "image_id column" in msg
    assert "does not exist" in _problems(tmp_path / "nowhere")[1]
    assert "is a file: pass the folder" in _problems(tmp_path / "empty" / "hmnist_28_28_L.csv")[1]
    root = tmp_path / "noimg"
    root.mkdir()
    (root / "HAM10000_metadata.csv").write_text(",".join(META_COLS) + "\nHAM_1,ISIC_1,nv,histo,5,male,back\n")
    err, msg = _problems(root, allow_missing=True)
    assert err.problems == ["HAM10000_metadata.csv: no image found for any of its 1 rows; looked for "
                            "<image_id>.jpg/.jpeg/.png in HAM10000_images_part_1/ and _part_2/ (folders or .zip)"]


def test_own_layout_detection(synth, tmp_path):
    df = load_source(synth).df
    root = to_own(df, tmp_path / "own")
    shutil.copytree(synth, root / "old-download")  # a Kaggle copy further down does not win
    st = load_source(root)
    assert st.layout == Layout.OWN and st.metadata_files == [root / "metadata.csv"]
    (root / "metadata.csv").rename(root / "labels.csv")
    shutil.copy(root / "labels.csv", root / "labels-v2.csv")
    err, msg = _problems(root)
    assert "several CSV files with an image_id column: labels-v2.csv, labels.csv" in msg
