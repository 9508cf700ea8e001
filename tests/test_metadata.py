"""Metadata as model inputs: the encoding (age z-score + missing flag, one-hot sex and site with an
unknown slot), its schema in the pack manifest (train-split statistics only), and dx_type never in it."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch

from hamengine.loaders.ingest import metadata as M


def _schema() -> M.MetaSchema:
    return M.MetaSchema(age_mean=50.0, age_std=10.0)


def test_encoding_layout_by_hand():
    s = _schema()
    cols = s.columns()
    v = s.encode_row({"age": 65, "sex": "Female", "localization": " lower extremity "})
    assert v.dtype == np.float32 and v.shape == (s.width,) == (len(cols),)
    assert v[cols.index("age_z")] == pytest.approx(1.5) and v[cols.index("age_missing")] == 0
    assert v[cols.index("sex=female")] == 1 and v[cols.index("site=lower extremity")] == 1
    assert v.sum() == pytest.approx(1.5 + 2)  # exactly one sex slot and one site slot set
    m = s.encode_row({"age": None, "sex": "unknown", "localization": "anterior torso"})  # ISIC 2019 name
    assert m[cols.index("age_z")] == 0 and m[cols.index("age_missing")] == 1
    assert m[cols.index("sex=unknown")] == 1 and m[cols.index("site=unknown")] == 1
    np.testing.assert_array_equal(m, s.missing())


def test_dx_type_and_other_columns_never_reach_the_encoding():
    s = _schema()
    base = {"age": 40, "sex": "male", "localization": "back"}
    variants = [dict(base, dx_type=t) for t in ("histo", "follow_up", "consensus", "confocal")]
    variants += [dict(base, dx="mel", lesion_id="HAM_0000001", dataset="vidir_modern")]
    for v in variants:
        np.testing.assert_array_equal(s.encode_row(v), s.encode_row(base))
    np.testing.assert_array_equal(s.encode_row({"dx_type": "histo"}), s.missing())
    assert not any("dx_type" in c or c.startswith("dx") for c in s.columns())
    assert "dx_type" in s.record()["never"] and "dx_type" not in s.record()["fields"]


@pytest.mark.parametrize(("row", "field"), [({"age": "forty"}, "age"), ({"age": -3}, "age"), ({"age": 300}, "age"),
                                            ({"sex": "m"}, "sex"), ({"localization": "elbow"}, "localization")])
def test_strict_errors_name_the_field(row, field):
    with pytest.raises(M.MetadataError, match=field):
        _schema().encode_row(row, strict=True)
    _schema().encode_row(row)  # from a pack: the unknown / missing encoding, never an error


def test_metadata_dropout_blanks_whole_fields():
    s = _schema()
    x = torch.from_numpy(s.encode([{"age": 20 + i % 60, "sex": "male", "localization": "face"} for i in range(400)]))
    assert torch.equal(M.drop_fields(x, s, 0.0), x)
    np.testing.assert_array_equal(M.drop_fields(x, s, 1.0).numpy(), np.tile(s.missing(), (400, 1)))
    g = torch.Generator().manual_seed(0)
    y = M.drop_fields(x, s, 0.5, g)
    for name, sl in s.slices().items():
        blanked = (y[:, sl] == torch.from_numpy(s.missing()[sl])).all(1)
        assert 0.35 < blanked.float().mean() < 0.65, name
        kept = ~blanked
        assert torch.equal(y[kept][:, sl], x[kept][:, sl])  # a field is dropped whole or not at all


def test_schema_record_round_trip():
    s = M.fit_schema([{"age": 20}, {"age": 40}, {"age": None}, {"age": "unknown"}])
    assert s.age_mean == pytest.approx(30) and s.age_std == pytest.approx(10)
    assert M.MetaSchema.from_record(s.record()) == s


def test_csv_to_pack_to_encoding_round_trip(synth_source, tmp_path):
    """Missing ages and unknown / unseen sites in the CSV come out of the pack encoded as specified,
    with age statistics from the train split only."""
    from hamengine.config import PackConfig
    from hamengine.loaders.pack.records import Pack
    from hamengine.loaders.pack.writer import pack_dataset

    src = tmp_path / "src"
    shutil.copytree(synth_source, src)
    path = src / "HAM10000_metadata.csv"
    rows = list(csv.DictReader(path.open()))
    for i, r in enumerate(rows):
        if i % 7 == 0:
            r["age"] = ""
        if i % 5 == 0:
            r["localization"] = "unknown"
        if i % 11 == 0:
            r["localization"] = "palms/soles"  # not a HAM10000 site: the unknown slot
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by_id = {r["image_id"]: r for r in rows}
    out = tmp_path / "pack"
    pack_dataset(PackConfig(source=str(src), out=str(out), size=48, workers=1), progress=False)
    pack = Pack(out)
    schema = pack.meta_schema()
    assert pack.manifest["metadata"]["age"]["fitted_on"] == "train"
    train_ages = [float(by_id[k]["age"]) for k in pack.keys("train") if by_id[k]["age"]]
    assert schema.age_mean == pytest.approx(np.mean(train_ages), abs=1e-5)
    assert schema.age_std == pytest.approx(np.std(train_ages), abs=1e-5)
    cols = schema.columns()
    for split in pack.splits:
        enc = schema.encode(pack.metadata(split))
        for key, v in zip(pack.keys(split), enc, strict=True):
            r = by_id[key]
            if r["age"]:
                assert v[cols.index("age_missing")] == 0
                assert v[cols.index("age_z")] == pytest.approx((float(r["age"]) - schema.age_mean) / schema.age_std,
                                                               abs=1e-5)
            else:
                assert v[cols.index("age_missing")] == 1 and v[cols.index("age_z")] == 0
            site = r["localization"] if r["localization"] in M.SITES else "unknown"
            assert v[cols.index(f"site={site}")] == 1
            sex = r["sex"] if r["sex"] in M.SEXES else "unknown"
            assert v[cols.index(f"sex={sex}")] == 1
