"""The pack output folder: which files are ours, when we may (re)write them, atomic writes.

States of `--out` before packing:
- missing or empty: start.
- complete pack (manifest.json) with the same recipe: nothing to do; with another recipe: refused
  unless --force.
- unfinished pack (`.pack-in-progress` marker, no manifest: Ctrl-C, kill -9, power loss) with the
  same recipe: start over (output depends only on the recipe, so the result equals an
  uninterrupted run); with another recipe: refused unless --force.
- anything else that is not empty: refused unless --force.
--force removes pack files only (shards, indexes, manifest, marker, temporaries); files that are
not ours are never deleted.
"""
from __future__ import annotations

import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any

from hamengine.fileio import atomic_write_bytes, fsync_dir
from hamengine.loaders.pack.records import MANIFEST, PackError

MARKER = ".pack-in-progress"
CACHE_DIR = "cache"  # the resident loader's cache (keyed by the manifest fingerprint)
_OURS = re.compile(r"^(\.?(train|val|test)-\d{6}\.(tar|idx)(\.tmp)?|manifest\.json(\.tmp)?|"
                   r"\.manifest\.json\.tmp|\.pack-in-progress(\.tmp)?)$")


class OutState(Enum):
    FRESH = "fresh"
    RESUME = "resume"  # an unfinished pack of the same recipe: redone from the start
    COMPLETE = "complete"  # already packed with this recipe


def is_ours(name: str) -> bool:
    return bool(_OURS.match(name))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def prepare(out: Path, recipe_sha: str, force: bool) -> OutState:
    """Decide what to do with `out`; raise PackError (naming the folder and the way out) if refused.
    Does not modify anything: call `clear` + `mark` to start."""
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out} exists and is not a folder; choose a folder path")
    if not out.exists():
        return OutState.FRESH
    names = sorted(os.listdir(out))
    manifest = _read_json(out / MANIFEST) if MANIFEST in names else None
    marker = _read_json(out / MARKER) if MARKER in names else None
    if manifest is not None:
        if manifest.get("recipe_sha256") == recipe_sha and not force:
            return OutState.COMPLETE
        if not force:
            raise PackError(f"--out {out} already holds a different pack (other source or options); "
                            f"pass --force to replace it, or choose another --out")
        return OutState.FRESH
    if marker is not None:
        if marker.get("recipe_sha256") == recipe_sha:
            return OutState.RESUME
        if not force:
            raise PackError(f"--out {out} holds an unfinished pack made with other options; run that "
                            f"command again to finish it, or pass --force to replace it")
        return OutState.FRESH
    foreign = [n for n in names if not is_ours(n) and n != CACHE_DIR]
    if names and not force:
        shown = ", ".join(foreign[:5] or names[:5]) + (" ..." if len(foreign) > 5 else "")
        raise PackError(f"--out {out} is not empty and is not a hamengine pack (holds {shown}); choose an "
                        f"empty or new folder, or pass --force (pack files are replaced, other files kept)")
    return OutState.FRESH


def clear(out: Path) -> None:
    """Remove our files: the manifest first, so no moment exists where it lists missing shards."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()
        fsync_dir(out)
    for name in sorted(os.listdir(out)):
        if is_ours(name) and name != MARKER and (out / name).is_file():
            (out / name).unlink()


def mark(out: Path, recipe: dict[str, Any], recipe_sha: str) -> None:
    atomic_write_bytes(out / MARKER, json.dumps({"recipe_sha256": recipe_sha, "recipe": recipe}, indent=2,
                                          sort_keys=True).encode())
    fsync_dir(out)


def finish(out: Path, manifest_bytes: bytes) -> None:
    """Manifest last and atomically, then the marker goes: from here on it is a complete pack."""
    fsync_dir(out)  # the shard renames are durable before the manifest that lists them
    atomic_write_bytes(out / MANIFEST, manifest_bytes)
    fsync_dir(out)
    (out / MARKER).unlink(missing_ok=True)
    fsync_dir(out)
