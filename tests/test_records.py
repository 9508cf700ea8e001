"""records.Pack, the reader every loader uses: random access, iteration, labels, errors, pickling."""
from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from builders import noise_source
from PIL import Image

from hamengine.config import CLASSES, PackConfig
from hamengine.loaders.pack.records import Pack, PackError
from hamengine.loaders.pack.writer import pack_dataset


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    src = noise_source(tmp_path_factory.mktemp("rsrc"), n=80, size=(80, 60))
    out = tmp_path_factory.mktemp("rpack") / "p"
    pack_dataset(PackConfig(source=str(src), out=str(out), size=60, shard_size=64 * 1024), progress=False)
    return out


def test_random_access_matches_the_tar_members(pack_dir):
    pack = Pack(pack_dir)
    assert pack.classes == CLASSES and pack.image_size == 60 and len(pack.fingerprint) == 64
    for split in ("train", "val", "test"):
        members = {}
        for shard in pack.shards(split):
            with tarfile.open(shard.path) as tf:
                for m in tf.getmembers():
                    members[m.name] = tf.extractfile(m).read()
        keys = pack.keys(split)
        assert len(keys) == pack.num_samples(split) == len(members) // 3 > 0
        labels = pack.labels(split)
        assert labels.dtype == np.int64 and labels.shape == (len(keys),)
        order = np.random.default_rng(0).permutation(len(keys))  # random, not sequential, access
        for i in order:
            k = keys[i]
            assert pack.jpeg(split, i) == members[f"{k}.jpg"]
            assert labels[i] == int(members[f"{k}.cls"])
            smp = pack.sample(split, i)
            assert smp.key == k and smp.meta == json.loads(members[f"{k}.json"]) and smp.label == labels[i]
            assert CLASSES[smp.label] == smp.meta["dx"]
        assert [s.key for s in pack.iter_samples(split)] == keys
        assert [m["image_id"] for m in pack.metadata(split)] == keys
        counts = np.bincount(labels, minlength=len(CLASSES))
        assert dict(zip(CLASSES, counts.tolist(), strict=True)) == pack.class_counts(split)


def test_jpeg_decodes_to_recorded_size(pack_dir):
    pack = Pack(pack_dir)
    smp = pack.sample("val", 0)
    with Image.open(io.BytesIO(smp.jpeg)) as im:
        assert im.size == (smp.meta["width"], smp.meta["height"]) == (80, 60)


def test_pickles_without_mmaps(pack_dir):
    pack = Pack(pack_dir)
    first = pack.jpeg("train", 0)  # opens an mmap
    clone = pickle.loads(pickle.dumps(pack))
    assert clone.jpeg("train", 0) == first and clone.labels("train").tolist() == pack.labels("train").tolist()


def test_errors_name_the_problem(pack_dir, tmp_path):
    pack = Pack(pack_dir)
    with pytest.raises(PackError, match="no split 'holdout'"):
        pack.shards("holdout")
    with pytest.raises(IndexError, match="out of range"):
        pack.jpeg("val", pack.num_samples("val"))
    with pytest.raises(PackError, match="no such pack folder"):
        Pack(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="not a complete pack: manifest.json is missing"):
        Pack(tmp_path / "empty")
    bad = tmp_path / "v2"
    bad.mkdir()
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(PackError, match="version 2"):
        Pack(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(PackError, match="not valid JSON"):
        Pack(bad)


def test_fingerprint_leaves_exports_out(pack_dir, tmp_path):
    """Recording an export (manifest `exports`) keeps the fingerprint; any other change moves it."""
    import shutil

    from hamengine.loaders.pack.records import manifest_bytes

    copy = tmp_path / "pack"
    shutil.copytree(pack_dir, copy)
    before = Pack(copy).fingerprint
    manifest = json.loads((copy / "manifest.json").read_bytes())
    assert manifest_bytes(manifest) == (copy / "manifest.json").read_bytes()  # the writer's bytes
    manifest["exports"] = {"ffcv": {"splits": {}}}
    (copy / "manifest.json").write_bytes(manifest_bytes(manifest))
    assert Pack(copy).fingerprint == before
    manifest["split"]["seed"] = manifest["split"]["seed"] + 1
    (copy / "manifest.json").write_bytes(manifest_bytes(manifest))
    assert Pack(copy).fingerprint != before
