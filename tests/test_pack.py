"""hamengine pack: format interoperability (webdataset, DALI), determinism, splits, image policy.

Sources are generated here in the Kaggle layout with tiny noise images (fast); the split statistics are
checked on full-size synthetic metadata without images (builders.noise_source makes the sources).
"""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import META, PART, noise_source
from click.testing import CliRunner
from PIL import Image

from hamengine.cli import cli
from hamengine.config import CLASSES, PackConfig
from hamengine.loaders.ingest.imaging import target_size
from hamengine.loaders.ingest.split import assign_splits, group_keys
from hamengine.loaders.ingest.synth import synth_metadata
from hamengine.loaders.pack.records import Pack
from hamengine.loaders.pack.tario import index_path_for
from hamengine.loaders.pack.writer import pack_dataset


def sha_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return noise_source(tmp_path_factory.mktemp("src"), n=150, size=(96, 72))


@pytest.fixture(scope="module")
def packed(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "p"
    pack_dataset(PackConfig(source=str(source), out=str(out), size=48, shard_size=64 * 1024, workers=2),
                 progress=False)
    return out


def _source_rows(source: Path) -> dict[str, dict]:
    df = pd.read_csv(source / META)
    return {r["image_id"]: r for r in df.to_dict("records")}


def test_webdataset_reads_every_sample(packed, source):
    import webdataset as wds

    pack = Pack(packed)
    rows = _source_rows(source)
    urls = [str(s.path) for s in pack.all_shards()]
    assert len(urls) > 3  # several shards: the 64KB limit rolled them
    seen = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        row = rows[s["__key__"]]
        assert meta["image_id"] == s["__key__"] and meta["lesion_id"] == row["lesion_id"]
        assert meta["dx"] == row["dx"] and int(s["cls"]) == CLASSES.index(row["dx"])
        assert (meta["age"], meta["sex"], meta["localization"]) == (row["age"], row["sex"], row["localization"])
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.mode == "RGB" and im.size == (meta["width"], meta["height"]) == (64, 48)
        seen.append(s["__key__"])
    assert sorted(seen) == sorted(rows)  # every image exactly once


def test_dali_reads_with_index_and_labels_match(packed, capfd):
    from nvidia.dali import fn, pipeline_def

    pack = Pack(packed)

    def read(split: str, with_index: bool) -> tuple[list[int], list[str]]:
        shards = pack.shards(split)

        @pipeline_def(batch_size=16, num_threads=1, device_id=None)
        def pipe():
            extra = {"index_paths": [str(s.idx_path) for s in shards]} if with_index else {}
            jpg, cls, meta = fn.readers.webdataset(paths=[str(s.path) for s in shards], ext=["jpg", "cls", "json"],
                                                   missing_component_behavior="error", name="r", **extra)
            return fn.decoders.image(jpg, device="cpu"), cls, meta

        p = pipe()
        p.build()
        n = p.epoch_size("r")
        labels, keys = [], []
        while len(labels) < n:
            img, cls, meta = p.run()
            for i in range(len(cls)):
                m = json.loads(bytes(np.array(meta.at(i))))
                assert np.array(img.at(i)).shape == (m["height"], m["width"], 3)
                labels.append(int(bytes(np.array(cls.at(i)))))
                keys.append(m["image_id"])
        return labels[:n], keys[:n]

    capfd.readouterr()
    for split in ("train", "val", "test"):
        labels, keys = read(split, with_index=True)
        assert labels == pack.labels(split).tolist() and keys == pack.keys(split)
    assert "Index file not provided" not in capfd.readouterr().err
    read("val", with_index=False)  # the warning we avoid really is printed without the index
    assert "Index file not provided" in capfd.readouterr().err


def test_index_equals_dalis_own_tool(packed):
    wds2idx = pytest.importorskip("wds2idx")
    for shard in Pack(packed).all_shards():
        ref = shard.path.with_suffix(".ref")
        with wds2idx.IndexCreator(str(shard.path), str(ref), verbose=False) as creator:
            creator.create_index()
        assert ref.read_text() == index_path_for(shard.path).read_text()
        ref.unlink()


def test_pack_is_byte_identical_and_worker_independent(source, packed, tmp_path):
    again = tmp_path / "again"
    pack_dataset(PackConfig(source=str(source), out=str(again), size=48, shard_size=64 * 1024, workers=1),
                 progress=False)
    assert sha_tree(again) == sha_tree(packed)
    assert "manifest.json" in sha_tree(again)
    other_seed = tmp_path / "seed1"
    pack_dataset(PackConfig(source=str(source), out=str(other_seed), size=48, shard_size=64 * 1024, seed=1),
                 progress=False)
    assert sha_tree(other_seed) != sha_tree(packed)


def test_tar_headers_carry_no_time_or_owner(packed):
    import tarfile
    for shard in Pack(packed).all_shards():
        with tarfile.open(shard.path) as tf:
            for m in tf.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_splits_grouped_ordered_and_counted(packed, source):
    pack = Pack(packed)
    lesions = {}
    for split in ("train", "val", "test"):
        metas = pack.metadata(split)
        for m in metas:
            assert lesions.setdefault(m["lesion_id"], split) == split, f"lesion {m['lesion_id']} in two splits"
        keys = pack.keys(split)
        assert (keys == sorted(keys)) == (split != "train")  # train shuffled, val/test by image_id
        counts = {c: 0 for c in CLASSES}
        for m in metas:
            counts[m["dx"]] += 1
        assert counts == pack.class_counts(split)
        assert len({m["lesion_id"] for m in metas}) == pack.manifest["splits"][split]["lesions"]
    total = sum(pack.num_samples(s) for s in ("train", "val", "test"))
    assert total == len(_source_rows(source))


@pytest.mark.parametrize("seed", [0, 1])
def test_split_stratified_within_2pp_at_full_size(seed):
    df = synth_metadata(10015, seed=3)
    splits = assign_splits(df, 0.15, 0.15, seed)
    spread = pd.DataFrame({"g": group_keys(df), "s": splits}).groupby("g")["s"].nunique()
    assert spread.max() == 1  # no lesion in two splits
    for dx, n in df["dx"].value_counts().items():
        if n < 100:
            continue
        mask = df["dx"].to_numpy() == dx
        for s, want in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
            got = float(np.mean(splits[mask] == s))
            assert abs(got - want) <= 0.02, f"{dx} {s}: {got:.3f} vs {want}"
    assert not np.array_equal(splits, assign_splits(df, 0.15, 0.15, seed + 7))  # the seed matters


def test_isic_validation_and_test_rows_are_pinned():
    df = synth_metadata(400, seed=0)
    df["split"] = None
    df.loc[df.index[:5], "split"] = "val"
    df.loc[df.index[5:9], "split"] = "test"
    splits = assign_splits(df, 0.15, 0.15, 0)
    assert list(splits[:5]) == ["val"] * 5 and list(splits[5:9]) == ["test"] * 4


def test_split_file_reproduces_a_split(packed, source, tmp_path):
    pack = Pack(packed)
    rows = [(k, s) for s in ("train", "val", "test") for k in pack.keys(s)]
    split_csv = tmp_path / "split.csv"
    pd.DataFrame(rows, columns=["image_id", "split"]).to_csv(split_csv, index=False)
    out = tmp_path / "fromfile"
    res = CliRunner().invoke(cli, ["pack", "--source", str(source), "--out", str(out), "--size", "48",
                                   "--split-file", str(split_csv), "--json"])
    assert res.exit_code == 0, res.output
    again = Pack(out)
    for s in ("train", "val", "test"):
        assert sorted(again.keys(s)) == sorted(pack.keys(s))
    assert again.manifest["split"]["method"] == "file"


def test_split_file_errors_name_the_line(source, tmp_path):
    df = pd.read_csv(source / META)
    rows = [(i, "train") for i in df["image_id"]]
    rows[3] = (rows[3][0], "holdout")
    rows.append(("ISIC_9999999", "val"))
    rows.append((rows[0][0], "train"))
    split_csv = tmp_path / "bad.csv"
    pd.DataFrame(rows, columns=["image_id", "split"]).to_csv(split_csv, index=False)
    res = CliRunner().invoke(cli, ["pack", "--source", str(source), "--out", str(tmp_path / "o"),
                                   "--split-file", str(split_csv)])
    assert res.exit_code == 1
    assert f"{split_csv}, line 5: split 'holdout'" in res.output
    assert f"line {len(df) + 2}: image_id 'ISIC_9999999' is not in the source" in res.output
    assert f"line {len(df) + 3}: image_id {rows[0][0]} listed again (first on line 2)" in res.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_resize_rule():
    assert target_size(600, 450, 256) == (341, 256)
    assert target_size(450, 600, 256) == (256, 341)
    assert target_size(200, 150, 256) == (200, 150)  # never upscaled
    assert target_size(1023, 512, 256) == (512, 256)  # 511.5 rounds half up


def test_keep_original_and_baseline_output(tmp_path):
    src = noise_source(tmp_path / "src", n=40, size=(64, 48))
    prog = noise_source(tmp_path / "prog", n=40, size=(64, 48), progressive=True)
    out, out_prog = tmp_path / "keep", tmp_path / "keep_prog"
    for s, o in ((src, out), (prog, out_prog)):
        pack_dataset(PackConfig(source=str(s), out=str(o), size=64, keep_original=True), progress=False)
    pack = Pack(out)
    assert pack.manifest["kept_original"] == 40
    for split in pack.splits:
        for smp in pack.iter_samples(split):
            assert smp.jpeg == (src / PART / f"{smp.key}.jpg").read_bytes()
    pack = Pack(out_prog)  # progressive sources are re-encoded as baseline (SOF0, no SOF2)
    assert pack.manifest["kept_original"] == 0
    jpg = pack.jpeg("train", 0)
    assert b"\xff\xc0" in jpg and b"\xff\xc2" not in jpg


def test_fixture_fullres70_packs_and_verifies(fullres70, tmp_path):
    out = tmp_path / "p70"
    r = CliRunner()
    res = r.invoke(cli, ["pack", "--source", str(fullres70), "--out", str(out), "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "akiec" in res.output and "lesions" in res.output  # the class x split table
    res = r.invoke(cli, ["verify", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["samples_checked"] == 70
    info = json.loads(r.invoke(cli, ["inspect", str(out), "--json"]).output)
    assert info["stats"]["width"] == {"min": 341, "max": 341, "mean": 341.0}
    assert sum(info["splits"][s]["samples"] for s in ("train", "val", "test")) == 70


@pytest.mark.slow
def test_fixture_dev200_packs_and_verifies(dev200, tmp_path):
    out = tmp_path / "dev"
    res = subprocess.run([sys.executable, "-m", "hamengine", "pack", "--source", str(dev200), "--out", str(out),
                          "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert sum(summary["splits"][s]["samples"] for s in ("train", "val", "test")) == 3011
    res = subprocess.run([sys.executable, "-m", "hamengine", "verify", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr


def test_bench_pack_reports_each_worker_count(tmp_path):
    src = noise_source(tmp_path / "src", n=30, size=(64, 48))
    res = CliRunner().invoke(cli, ["bench", "pack", "--source", str(src), "--workers", "1,2", "--size", "48",
                                   "--tmp", str(tmp_path), "--out", str(tmp_path / "r.json"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["workers"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["images"] == 30 and r["images_per_s"] > 0 and r["peak_rss_mb"] > 10
        assert r["peak_tree_rss_mb"] > 0  # sampled from /proc while it ran
    assert report["results"][0]["speedup"] == 1.0 and report["hardware"]["cpus"] >= 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("hamengine-bench")] == []  # cleaned up


def test_zipped_dataverse_and_isic_layouts_pack_the_same_images(source, packed, tmp_path):
    from test_sources import to_dataverse, to_isic

    from hamengine.loaders.ingest.sources import load_source

    df = load_source(source).df
    kaggle = Pack(packed)
    jpgs = {k: kaggle.jpeg(s, i) for s in kaggle.splits for i, k in enumerate(kaggle.keys(s))}
    dv = to_dataverse(df, tmp_path / "dv", zipped=True)  # images read from inside the zips by the workers
    pack_dataset(PackConfig(source=str(dv), out=str(tmp_path / "pdv"), size=48, workers=2), progress=False)
    p = Pack(tmp_path / "pdv")
    assert p.manifest["source"]["layout"] == "dataverse"
    for s in p.splits:
        assert sorted(p.keys(s)) == sorted(kaggle.keys(s))  # same metadata -> same split
        for i, k in enumerate(p.keys(s)):
            assert p.jpeg(s, i) == jpgs[k]
    val, test = df.iloc[:6], df.iloc[6:10]
    isic = to_isic(df.iloc[10:], tmp_path / "isic", val=val, test=test)
    pack_dataset(PackConfig(source=str(isic), out=str(tmp_path / "pisic"), size=48), progress=False)
    p = Pack(tmp_path / "pisic")
    assert set(val.image_id) <= set(p.keys("val")) and set(test.image_id) <= set(p.keys("test"))
