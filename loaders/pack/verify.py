"""`hamengine verify`: check a pack against its manifest, down to every sample; stop at the first fault.

Quick mode: every shard and index exists with the manifest's size and sha256, and the index holds
the manifest's sample count. Full mode also walks every tar header (checksums, names, offsets must
equal the index), and checks every sample: label in range and equal to its metadata's dx, key equal
to image_id, JPEG bytes equal to the sha256 recorded in its metadata, JPEG decodes to the recorded
size. A shard whose hash differs is searched sample by sample so the report names the sample.
Both modes then hash every export the manifest records (FFCV's .beton files) against its sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from hamengine.fileio import file_sha256
from hamengine.loaders.pack import ffcv_record
from hamengine.loaders.pack.records import COMPONENTS, Pack, PackError, Shard
from hamengine.loaders.pack.tario import BLOCK, Component, TarIndexError, read_index


@dataclass
class Fault:
    shard: str
    message: str
    sample: str | None = None  # key (image_id) of the first bad sample, when one can be named
    index: int | None = None  # its position in the shard


@dataclass
class VerifyReport:
    pack: str
    quick: bool
    shards: int = 0
    samples: int = 0
    exports: list[str] = field(default_factory=list)  # exports checked (e.g. "ffcv")
    fault: Fault | None = None
    counts: dict[str, Counter] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.fault is None

    def to_dict(self) -> dict[str, Any]:
        return {"pack": self.pack, "ok": self.ok, "quick": self.quick, "shards_checked": self.shards,
                "samples_checked": self.samples, "exports_checked": self.exports, "fault": None if self.fault is None else vars(self.fault)}


def _walk_tar(m: mmap.mmap) -> list[Component]:
    """Every member of the tar as (ext, data offset, size, name); raises ValueError at a bad header."""
    out, pos = [], 0
    while pos + BLOCK <= len(m):
        block = m[pos:pos + BLOCK]
        if block == b"\0" * BLOCK:
            return out
        try:
            info = tarfile.TarInfo.frombuf(block, "ascii", "strict")
        except (tarfile.HeaderError, UnicodeDecodeError) as e:
            raise ValueError(f"bad tar header at byte {pos} ({e})") from None
        ext = info.name.split(".", 1)[1] if "." in info.name else ""
        out.append(Component(ext, pos + BLOCK, info.size, info.name))
        pos += BLOCK + info.size + (-info.size) % BLOCK
    raise ValueError("the archive ends without its end-of-archive blocks (truncated)")


def _check_sample(pack: Pack, shard: Shard, m: mmap.mmap, entry: list[Component]) -> str | None:
    """The first problem with one sample, or None."""
    parts = {c.ext: bytes(m[c.offset:c.offset + c.size]) for c in entry}
    key = entry[0].name.split(".", 1)[0]
    if sorted(parts) != sorted(COMPONENTS) or any(c.name != f"{key}.{c.ext}" for c in entry):
        return f"members {[c.name for c in entry]} are not {key}.cls/.jpg/.json"
    try:
        label = int(parts["cls"])
    except ValueError:
        return f"label {parts['cls'][:20]!r} is not an integer"
    if not 0 <= label < len(pack.classes):
        return f"label {label} outside 0..{len(pack.classes) - 1}"
    try:
        meta = json.loads(parts["json"])
    except ValueError as e:
        return f"metadata is not valid JSON ({e})"
    if meta.get("image_id") != key:
        return f"metadata image_id {meta.get('image_id')!r} differs from the key"
    if meta.get("dx") not in pack.classes or pack.classes.index(meta["dx"]) != label:
        return f"label {label} does not match metadata dx {meta.get('dx')!r}"
    if meta.get("split") != shard.split:
        return f"metadata split {meta.get('split')!r} in a {shard.split} shard"
    if hashlib.sha256(parts["jpg"]).hexdigest() != meta.get("jpg_sha256"):
        return "JPEG bytes differ from the sha256 recorded at pack time (corrupted)"
    try:
        with Image.open(io.BytesIO(parts["jpg"])) as im:
            im.load()
            size = im.size
    except Exception as e:
        return f"JPEG does not decode ({e})"
    if size != (meta.get("width"), meta.get("height")):
        return f"JPEG is {size[0]}x{size[1]}, metadata says {meta.get('width')}x{meta.get('height')}"
    return None


def _check_shard(pack: Pack, shard: Shard, quick: bool, report: VerifyReport) -> Fault | None:
    name = shard.name
    if not shard.path.is_file():
        return Fault(name, "shard file is missing")
    if not shard.idx_path.is_file():
        return Fault(name, f"index {shard.idx_path.name} is missing")
    try:
        entries = read_index(shard.idx_path)
    except TarIndexError as e:
        return Fault(name, str(e))
    info = next(s for s in pack.manifest["shards"] if s["name"] == name)
    idx_sha = info.get("index_sha256")
    if idx_sha and file_sha256(shard.idx_path) != idx_sha:
        return Fault(name, f"index {shard.idx_path.name} differs from the manifest's sha256")
    if len(entries) != shard.samples:
        return Fault(name, f"index lists {len(entries)} samples, the manifest says {shard.samples}")
    size = shard.path.stat().st_size
    if size != shard.bytes:
        # Truncated (or grown): name the first sample that does not fit in the file.
        for i, entry in enumerate(entries):
            if any(c.offset + c.size > size for c in entry):
                return Fault(name, f"shard is {size} bytes, the manifest says {shard.bytes} (truncated); "
                             "this is the first sample cut off", entry[0].name.split(".", 1)[0], i)
        return Fault(name, f"shard is {size} bytes, the manifest says {shard.bytes}")
    hash_ok = file_sha256(shard.path) == shard.sha256
    if quick:
        report.samples += shard.samples
        return None if hash_ok else Fault(name, "sha256 differs from the manifest (corrupted); run without "
                                                "--quick to find the sample")
    with open(shard.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        try:
            members = _walk_tar(m)
        except ValueError as e:
            return Fault(name, str(e))
        flat = [c for entry in entries for c in entry]
        for i, entry in enumerate(entries):
            key = entry[0].name.split(".", 1)[0]
            if any(c.offset + c.size > len(m) for c in entry):
                return Fault(name, "index points past the end of the shard", key, i)
            problem = _check_sample(pack, shard, m, entry)
            if problem:
                return Fault(name, problem, key, i)
            report.samples += 1
            report.counts.setdefault(shard.split, Counter())[pack.classes[int(m[entry[0].offset:entry[0].offset
                                                                             + entry[0].size])]] += 1
        if members != flat:
            bad = next((j for j, (a, b) in enumerate(zip(members, flat, strict=False)) if a != b),
                       min(len(members), len(flat)))
            what = members[bad].name if bad < len(members) else "(end of archive)"
            return Fault(name, f"tar member {bad} ({what}) does not match the index")
    if not hash_ok:
        return Fault(name, "sha256 differs from the manifest, but every sample checks out: the damage is "
                           "in tar headers, metadata fields or padding")
    return None


def verify_pack(path: str | Path, quick: bool = False,
                on_shard: Callable[[Shard], None] | None = None) -> VerifyReport:
    """Check the pack; report.fault names the first bad shard (and sample). Raises PackError only
    when the manifest itself cannot be read."""
    pack = Pack(path, check_files=False)
    report = VerifyReport(str(path), quick)
    for shard in pack.all_shards():
        fault = _check_shard(pack, shard, quick, report)
        if on_shard:
            on_shard(shard)
        if fault:
            report.fault = fault
            return report
        report.shards += 1
    if not quick:
        for split_name, info in pack.manifest["splits"].items():
            got = report.counts.get(split_name, Counter())
            want = {k: v for k, v in info["classes"].items() if v}
            if dict(got) != want:
                report.fault = Fault(f"{split_name} split", f"class counts {dict(got)} differ from the "
                                     f"manifest's {want}")
                return report
    else:
        for split_name, info in pack.manifest["splits"].items():
            n = sum(s.samples for s in pack.shards(split_name))
            if n != info["samples"]:
                report.fault = Fault(f"{split_name} split", f"shards hold {n} samples, the manifest says "
                                     f"{info['samples']}")
                return report
    for name in ffcv_record.export_names(pack.manifest):
        problems = ffcv_record.check_export(pack, name)
        if problems:
            report.fault = Fault(f"{name} export", problems[0])
            return report
        report.exports.append(name)
    return report


__all__ = ["Fault", "PackError", "VerifyReport", "verify_pack"]
