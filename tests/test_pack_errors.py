"""hamengine pack / verify under bad input: broken images, occupied --out, interruption, damaged packs.
Every case checks what the user sees: exit code and a message naming the file (and sample)."""
from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from builders import PART, copy_of, noise_source
from click.testing import CliRunner
from PIL import Image
from test_pack import sha_tree

from hamengine.cli import cli
from hamengine.config import PackConfig
from hamengine.hooks import ENV as HOOKS
from hamengine.loaders.pack.packdir import MARKER
from hamengine.loaders.pack.records import Pack, PackError
from hamengine.loaders.pack.writer import pack_dataset


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a decompression bomb's header, without the bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


BAD = {  # index into the image list -> expected reason fragment
    0: "truncated",
    1: "empty file (0 bytes)",
    2: "not an image",
    3: "exceeds the limit of 64,000,000",
}


@pytest.fixture(scope="module")
def broken_source(tmp_path_factory) -> tuple[Path, list[str]]:
    root = noise_source(tmp_path_factory.mktemp("broken"), n=30, size=(64, 48))
    ids = sorted(p.stem for p in (root / PART).iterdir())
    path = [root / PART / f"{i}.jpg" for i in ids]
    rgb = Image.open(path[10]).convert("RGB")
    good = path[11].read_bytes()
    path[0].write_bytes(good[: len(good) // 2])
    path[1].write_bytes(b"")
    path[2].write_bytes(b"id,dx\nISIC_1,nv\n")
    path[3].write_bytes(_png_header_only(20000, 5000))  # 100 M pixels
    path[4].write_bytes(_encode(rgb.convert("L"), "JPEG"))
    path[5].write_bytes(_encode(rgb.convert("CMYK"), "JPEG"))
    path[6].write_bytes(_encode(rgb, "PNG"))
    path[7].write_bytes(_encode(Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)), "PNG"))
    path[8].write_bytes(_encode(rgb.convert("P"), "PNG"))
    path[9].write_bytes(_encode(rgb.convert("RGBA"), "PNG"))
    return root, ids


def test_bad_images_fail_listing_every_file(broken_source, tmp_path):
    root, ids = broken_source
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["pack", "--source", str(root), "--out", str(out)])
    assert res.exit_code == 1
    assert "4 image(s)" in res.output and "--skip-bad" in res.output
    for i, reason in BAD.items():
        assert f"{PART}/{ids[i]}.jpg: " in res.output and reason in res.output
    for i in range(4, 12):  # convertible or fine: not listed
        assert ids[i] not in res.output
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    with pytest.raises(PackError, match="not a complete pack"):
        Pack(out)


def test_skip_bad_records_reasons_and_converts_the_rest(broken_source, tmp_path):
    root, ids = broken_source
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["pack", "--source", str(root), "--out", str(out), "--skip-bad"])
    assert res.exit_code == 0, res.output
    for i in BAD:
        assert f"skipped {PART}/{ids[i]}.jpg" in res.output
    pack = Pack(out)
    skipped = {s["image_id"]: s["reason"] for s in pack.manifest["skipped"]}
    assert set(skipped) == {ids[i] for i in BAD}
    for i, reason in BAD.items():
        assert reason in skipped[ids[i]]
    assert pack.manifest["converted"] == {"16-bit": 1, "alpha-dropped": 1, "cmyk": 1, "grayscale": 1,
                                          "not-jpeg": 4, "palette": 1}
    keys = {k for s in pack.splits for k in pack.keys(s)}
    assert keys == set(ids) - {ids[i] for i in BAD}
    for s in pack.splits:
        for smp in pack.iter_samples(s):
            with Image.open(io.BytesIO(smp.jpeg)) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 48)


def test_pixel_limit_is_an_option(tmp_path):
    root = noise_source(tmp_path / "src", n=10, size=(64, 48))
    res = CliRunner().invoke(cli, ["pack", "--source", str(root), "--out", str(tmp_path / "o"),
                                   "--max-pixels", "3000"])
    assert res.exit_code == 1 and "10 image(s)" in res.output and "64x48 = 3,072 pixels" in res.output


def test_out_folder_rules(tmp_path):
    root = noise_source(tmp_path / "src", n=40, size=(64, 48))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = ["pack", "--source", str(root), "--out", str(out), "--size", "48"]
    r = CliRunner()
    res = r.invoke(cli, base)
    assert res.exit_code == 1 and "is not empty and is not a hamengine pack (holds notes.txt)" in res.output
    res = r.invoke(cli, [*base, "--force", "--shard-size", "64KB"])
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine"  # never deleted: not ours
    assert (out / "train-000001.tar").exists()
    res = r.invoke(cli, [*base, "--shard-size", "64KB"])
    assert res.exit_code == 0 and "nothing to do" in res.output
    res = r.invoke(cli, [*base, "--seed", "1"])
    assert res.exit_code == 1 and "already holds a different pack" in res.output
    res = r.invoke(cli, [*base, "--seed", "1", "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "train-000001.tar").exists()  # the old pack's extra shards are gone
    assert Pack(out).manifest["split"]["seed"] == 1
    (out / "manifest.json").unlink()
    (out / MARKER).write_text('{"recipe_sha256": "other"}')
    res = r.invoke(cli, base)
    assert res.exit_code == 1 and "unfinished pack made with other options" in res.output


@pytest.fixture(scope="module")
def interrupt_case(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A source big enough to be caught mid-pack, its uninterrupted pack, and the pack options."""
    root = noise_source(tmp_path_factory.mktemp("isrc"), n=300, size=(96, 72))
    ref = tmp_path_factory.mktemp("iref") / "ref"
    pack_dataset(PackConfig(source=str(root), out=str(ref), size=72, shard_size=64 * 1024, workers=2),
                 progress=False)
    return root, ref, ["--size", "72", "--shard-size", "64KB", "--workers", "2"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_pack_reruns_to_identical_bytes(sig, interrupt_case, tmp_path):
    root, ref, opts = interrupt_case
    out = tmp_path / "out"
    args = ["pack", "--source", str(root), "--out", str(out), *opts]
    # Interrupted once its 3rd shard is complete: the whole process group (the pack and its pool
    # workers), as Ctrl-C or a killed job would; its own session, so the signal stays there.
    action = {signal.SIGKILL: "kill-group", signal.SIGINT: "sigint-group"}[sig]
    env = {**os.environ, HOOKS: f"pack.shard_done@3:{action}"}
    proc = subprocess.run([sys.executable, "-m", "hamengine", *args], capture_output=True, env=env,
                          timeout=120, start_new_session=True,
                          # a shell's background job starts with SIGINT ignored: give the child the
                          # default disposition a terminal's job has, or Ctrl-C is never delivered
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = proc.stderr
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), err
    if sig == signal.SIGINT:
        assert b"run the same command again" in err
    assert not (out / "manifest.json").exists() and (out / MARKER).exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar",
                                                         "train-000002.tar"]
    with pytest.raises(PackError, match="interrupted"):
        Pack(out)
    res = CliRunner().invoke(cli, args)  # the same command again
    assert res.exit_code == 0, res.output
    assert "interrupted pack" in res.output
    assert sha_tree(out) == sha_tree(ref)


@pytest.fixture()
def pack_copy(verify_pack, tmp_path) -> Path:
    """A private copy of conftest.py's `verify_pack` (60 images in 64 KB shards), for damaging."""
    return copy_of(verify_pack, tmp_path / "p")


def _verify(pack: Path, *extra: str):
    return CliRunner().invoke(cli, ["verify", str(pack), *extra])


def test_verify_passes_clean_pack(pack_copy):
    for extra in ((), ("--quick",)):
        res = _verify(pack_copy, *extra)
        assert res.exit_code == 0 and "ok" in res.output, res.output


def test_verify_names_shard_and_sample_of_a_flipped_byte(pack_copy):
    pack = Pack(pack_copy)
    shard = pack.shards("train")[1]
    i = 2
    key = pack.keys("train")[pack.shards("train")[0].samples + i]
    idx = pack._split_index("train")
    row = pack.shards("train")[0].samples + i
    pos = int(idx.offsets[row, 1] + idx.sizes[row, 1] // 2)  # the middle of the JPEG data
    data = bytearray(shard.path.read_bytes())
    data[pos] ^= 0x01
    shard.path.write_bytes(bytes(data))
    res = _verify(pack_copy)
    assert res.exit_code == 1
    assert f"{shard.name}, sample {i} ({key}): JPEG bytes differ" in res.output
    res = _verify(pack_copy, "--quick")
    assert res.exit_code == 1 and f"{shard.name}: sha256 differs" in res.output


def test_verify_names_a_truncated_shard(pack_copy):
    pack = Pack(pack_copy)
    shard = pack.shards("val")[0]
    with open(shard.path, "r+b") as f:
        f.truncate(shard.bytes // 2)
    res = _verify(pack_copy)
    assert res.exit_code == 1 and f"{shard.name}, sample" in res.output and "truncated" in res.output
    with pytest.raises(PackError, match=f"{shard.name}: {shard.bytes // 2} bytes.*truncated"):
        Pack(pack_copy)


def test_missing_shard_is_named(pack_copy):
    shard = Pack(pack_copy).shards("test")[0]
    shard.path.unlink()
    with pytest.raises(PackError, match=f"{shard.name}: shard listed in manifest.json is missing"):
        Pack(pack_copy)
    res = _verify(pack_copy)
    assert res.exit_code == 1 and f"{shard.name}: shard file is missing" in res.output
