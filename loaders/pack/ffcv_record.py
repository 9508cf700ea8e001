"""Where a pack's FFCV export lives and how the pack vouches for it.

Files: PACK/<name>/<split>.beton. Record: the pack's manifest.json under `exports.<name>` (format,
version, and each split's file, samples, bytes and sha256). Names: `ffcv` (jpg mode: the pack's JPEG
bytes; what `--loader ffcv` reads), `ffcv-raw-<S>` (raw mode: the resident cache's pixels at output
side S), `ffcv-proportion` (FFCV's proportion mode). Each name is an independent export. The pack's fingerprint leaves `exports`
out (records.fingerprint), so recording an export does not change it. The record is written after
its files and removed before they are rewritten, so it never vouches for a partial or mixed export.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hamengine.fileio import atomic_write_bytes, file_sha256, fsync_dir
from hamengine.loaders.pack.records import EXPORTS, MANIFEST, Pack, PackError, fingerprint, manifest_bytes

FORMAT = "hamengine-ffcv"
VERSION = 1
DIR_NAME = "ffcv"  # PACK/ffcv/<split>.beton; also the key under the manifest's `exports`


class FFCVExportError(PackError):
    """The FFCV export of a pack is missing, stale or damaged; the message says what to run."""


def export_dir(pack: Pack, name: str = DIR_NAME) -> Path:
    return pack.path / name


def export_names(manifest: dict[str, Any]) -> list[str]:
    """The FFCV exports the manifest records (ffcv, ffcv-raw-<S>, ffcv-proportion)."""
    exports = manifest.get(EXPORTS)
    return sorted(k for k in exports if k == DIR_NAME or k.startswith(DIR_NAME + "-")) \
        if isinstance(exports, dict) else []


_SPLIT_FIELDS = ("file", "samples", "bytes", "sha256")


def _manifest_on_disk(pack: Pack) -> tuple[dict[str, Any], bytes]:
    """PACK/manifest.json as it is now, parsed and raw (another process may have recorded an export
    since `pack` was opened); refuses a manifest that no longer describes the same pack."""
    path = pack.path / MANIFEST
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError) as e:
        raise PackError(f"{path}: cannot be read ({e}); re-run `hamengine pack` (same command)") from None
    if not isinstance(manifest, dict) or fingerprint(manifest, raw) != pack.fingerprint:
        raise PackError(f"{path}: the pack was rebuilt while in use; open it again (re-run the command)")
    return manifest, raw


def recorded_export(manifest: dict[str, Any], name: str = DIR_NAME) -> Any:
    """Whatever the manifest holds under exports.<name> (None when nothing)."""
    exports = manifest.get(EXPORTS)
    return exports.get(name) if isinstance(exports, dict) else None


def valid_record(record: Any) -> bool:
    """A record this version wrote: format, version and every split's file, samples, bytes, sha256."""
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        return False
    splits = record.get("splits")
    return isinstance(splits, dict) and all(
        isinstance(info, dict) and all(k in info for k in _SPLIT_FIELDS) for info in splits.values())


def matches_pack(record: dict[str, Any], pack: Pack) -> bool:
    """The record lists every non-empty split of the pack, each with the pack's sample count."""
    splits = {s for s in pack.splits if pack.num_samples(s) > 0}
    return set(record["splits"]) == splits and all(
        record["splits"][s]["samples"] == pack.num_samples(s) and record["splits"][s]["file"] == f"{s}.beton"
        for s in splits)


def read_export(pack: Pack, check_files: bool = True, name: str = DIR_NAME) -> dict[str, Any] | None:
    """The manifest's record of the FFCV export if it covers the pack's splits and every file it
    lists is present with its recorded size; None when there is no usable export (never made, made
    by another version, edited, or partial)."""
    record = recorded_export(_manifest_on_disk(pack)[0], name)
    if not valid_record(record) or not matches_pack(record, pack):
        return None
    if check_files:
        for info in record["splits"].values():
            f = export_dir(pack, name) / info["file"]
            if not f.is_file() or f.stat().st_size != info["bytes"]:
                return None
    return record


def write_record(pack: Pack, record: dict[str, Any] | None, name: str = DIR_NAME) -> None:
    """Set (record) or remove (None) exports.<name> in PACK/manifest.json: one atomic replace (none
    when there is nothing to remove).

    The fingerprint is defined over the manifest as `pack` wrote it; a manifest re-indented or
    edited by hand would get another fingerprint once re-serialized, so it is refused instead."""
    manifest, raw = _manifest_on_disk(pack)
    exports = manifest.get(EXPORTS) if isinstance(manifest.get(EXPORTS), dict) else {}
    if EXPORTS not in manifest and manifest_bytes(manifest) != raw:
        raise FFCVExportError(f"{pack.path / MANIFEST} is not in the form `hamengine pack` writes (edited by "
                              f"hand?), so recording an export would change the pack's fingerprint; re-run "
                              f"`hamengine pack` (same command, --force) to rewrite it")
    if record is None:
        if name not in exports:
            return  # nothing recorded: nothing to write
        exports.pop(name)
    else:
        exports[name] = record
    manifest.pop(EXPORTS, None)
    if exports:
        manifest[EXPORTS] = exports
    try:
        atomic_write_bytes(pack.path / MANIFEST, manifest_bytes(manifest))
        fsync_dir(pack.path)
    except OSError as e:
        raise FFCVExportError(f"{pack.path / MANIFEST}: cannot record the FFCV export ({e.strerror}); the "
                              f"pack folder must be writable") from None
    pack.manifest = manifest


@contextmanager
def export_lock(out_dir: Path):
    """One exporter per pack at a time (DDP ranks building their loaders at once): the others wait,
    then find the export up to date. The lock file is never taken for data."""
    import fcntl

    with open(out_dir / ".export.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def mode_options(name: str) -> str:
    """The export-ffcv options that make export `name` (for the messages' re-run commands)."""
    rest = name[len(DIR_NAME) + 1:] if name.startswith(DIR_NAME + "-") else ""
    if rest.startswith("raw-"):
        return f" --mode raw --size {rest[4:]}"
    return f" --mode {rest}" if rest else ""


def check_export(pack: Pack, name: str = DIR_NAME) -> list[str]:
    """Problems with an FFCV export (for `hamengine verify` / `inspect`): [] when the manifest
    records none or every recorded .beton hashes to its recorded sha256."""
    where = f"{pack.path / MANIFEST} ({EXPORTS}.{name})"
    rerun = f"hamengine export-ffcv {pack.path}{mode_options(name)}"
    recorded = recorded_export(_manifest_on_disk(pack)[0], name)
    if recorded is None:
        return []
    if not valid_record(recorded):
        return [f"{where}: an export record this version cannot read; run `{rerun} --force`"]
    if not matches_pack(recorded, pack):
        return [f"{where}: lists other splits, files or sample counts than the pack holds (edited?); run "
                f"`{rerun} --force`"]
    problems = []
    for info in recorded["splits"].values():
        f = export_dir(pack, name) / info["file"]
        if not f.is_file():
            problems.append(f"{f}: missing (listed in {where}); run `{rerun}`")
        elif f.stat().st_size != info["bytes"] or file_sha256(f) != info["sha256"]:
            problems.append(f"{f}: differs from {where} (damaged or replaced); run `{rerun} --force`")
    return problems
