"""Deterministic webdataset tar shards and DALI's webdataset index (v1.2).

Why our own writer instead of `tarfile.open("w")`: we need the byte offset of every member's data
for the index while streaming, a hash of the exact bytes written, and headers with nothing
machine- or time-dependent in them (mtime 0, uid/gid 0, empty owner names, mode 0644, USTAR), so that
the same samples always give the same bytes.

Tar layout per member: one 512-byte USTAR header, the data, zero padding to a 512 multiple. The
archive ends with two zero blocks, padded to tarfile's 10 KiB record size (what tar and Python's
tarfile write, so `tar -tf` and tarfile read it without complaint).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hamengine.errors import UserError

BLOCK = 512
RECORD = tarfile.RECORDSIZE  # 20 blocks = 10240 bytes
INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Component:
    """One member of a sample as the index records it: data offset and size inside the tar."""

    ext: str
    offset: int  # where the data starts (header offset + 512); always a multiple of 512
    size: int
    name: str


class TarIndexError(UserError, ValueError):
    """An .idx file that cannot be parsed (the message names the file and line)."""


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    # USTAR is enough: member names are short ASCII; no PAX records means one header per member.
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


def _padding(n: int) -> int:
    return (-n) % BLOCK


def member_bytes(size: int) -> int:
    """Bytes one member of `size` data bytes occupies in the tar (header + data + padding)."""
    return BLOCK + size + _padding(size)


def archive_bytes(payload: int) -> int:
    """Total tar size for `payload` bytes of members: end-of-archive blocks + record padding."""
    total = payload + 2 * BLOCK
    return total + (-total) % RECORD


class ShardWriter:
    """Stream samples into one tar shard, keeping the index and a sha256 of every byte written.

    The caller writes to a temporary path and renames after `close()` (see pack.py): a shard under
    its final name is always complete.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f: BinaryIO = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self.pos = 0
        self.samples: list[list[Component]] = []

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.pos += len(data)

    def add(self, key: str, components: list[tuple[str, bytes]]) -> None:
        """Append one sample; its members are consecutive (webdataset and DALI need that)."""
        if "." in key or "/" in key or " " in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.', '/' or spaces")
        entry = []
        for ext, data in components:
            name = f"{key}.{ext}"
            self._write(_header(name, len(data)))
            entry.append(Component(ext, self.pos, len(data), name))
            self._write(data)
            self._write(b"\0" * _padding(len(data)))
        self.samples.append(entry)

    def close(self) -> tuple[int, str]:
        """Finish the archive, fsync it; returns (bytes, sha256 hex)."""
        end = 2 * BLOCK
        end += (-(self.pos + end)) % RECORD
        self._write(b"\0" * end)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self.pos, self._sha.hexdigest()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


def index_text(samples: list[list[Component]]) -> str:
    """DALI webdataset index v1.2: `v1.2 N`, then per sample `ext offset size name` per component."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for entry in samples:
        lines.append(" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in entry))
    return "\n".join(lines) + "\n"


def read_index(path: str | Path) -> list[list[Component]]:
    """Parse a v1.2 index; raises TarIndexError naming the file and line on anything malformed."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TarIndexError(f"{p}: cannot read index ({e})") from None
    if not lines:
        raise TarIndexError(f"{p}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise TarIndexError(f"{p}, line 1: expected '{INDEX_VERSION} <samples>', got {lines[0]!r}")
    n = int(head[1])
    if len(lines) - 1 != n:
        raise TarIndexError(f"{p}: header says {n} samples but {len(lines) - 1} lines follow")
    out = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise TarIndexError(f"{p}, line {lineno}: expected groups of 'ext offset size name'")
        entry = []
        for i in range(0, len(parts), 4):
            ext, off, size, name = parts[i:i + 4]
            if not (off.isdigit() and size.isdigit()) or int(off) % BLOCK:
                raise TarIndexError(f"{p}, line {lineno}: bad offset/size {off!r} {size!r}")
            entry.append(Component(ext, int(off), int(size), name))
        out.append(entry)
    return out


def index_path_for(shard: str | Path) -> Path:
    """`train-000000.tar` -> `train-000000.idx` (DALI's wds2idx naming)."""
    p = Path(shard)
    return p.with_name(p.name.split(".", 1)[0] + ".idx")
