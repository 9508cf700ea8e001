"""`hamengine pack`: a HAM10000 source folder -> a pack (format v1, see records.py / DESIGN.md).

Flow: ingest (sources.load_source) -> split (split.py) -> order samples (train: seeded shuffle, since
DALI only shuffles within a buffer; val/test: by image_id) -> process images in a pool (imaging.py)
-> stream results, in order, into tar shards (tario.py) -> manifest last (packdir.py).

Everything written depends only on the recipe (source metadata + options), never on time, worker
count or scheduling: pool results are consumed in input order, so packs are byte-identical.
Memory stays flat: the feeder lets at most `_inflight` images be ahead of the shard writer.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing as mp
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hamengine.config import CLASSES, SPLITS, PackConfig
from hamengine.fileio import atomic_write_bytes
from hamengine.hooks import fire
from hamengine.loaders.ingest import split
from hamengine.loaders.ingest.imaging import BadImage, ImagePolicy, process
from hamengine.loaders.ingest.metadata import FIELDS, fit_schema
from hamengine.loaders.ingest.sources import ZIP_PREFIX, load_source, read_image_bytes
from hamengine.loaders.pack import ffcv_record, packdir
from hamengine.loaders.pack.records import FORMAT, VERSION, Pack, PackError, manifest_bytes
from hamengine.loaders.pack.tario import ShardWriter, archive_bytes, index_path_for, index_text, member_bytes
from hamengine.runtime import cpu_count

CHUNK = 4  # images per pool task: small keeps the ordered stream smooth, >1 amortises IPC
META_COLUMNS = ["image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]


@dataclass(frozen=True)
class _Result:
    jpeg: bytes | None
    width: int = 0
    height: int = 0
    orig_width: int = 0
    orig_height: int = 0
    conversions: tuple[str, ...] = ()
    kept_original: bool = False
    error: str | None = None


def _work(ref: str, policy: ImagePolicy) -> _Result:
    """Pool worker: read + process one image. Never raises: errors come back as data, in order."""
    try:
        data = read_image_bytes(ref)
    except (OSError, KeyError, ValueError) as e:
        return _Result(None, error=f"cannot read the file ({e})")
    try:
        enc = process(data, policy)
    except BadImage as e:
        return _Result(None, error=str(e))
    except Exception as e:  # a decoder bug on a hostile file must not kill the whole pack
        return _Result(None, error=f"cannot decode ({type(e).__name__}: {e})")
    return _Result(enc.jpeg, enc.width, enc.height, enc.orig_width, enc.orig_height, enc.conversions,
                   enc.kept_original)


def _display_ref(root: Path, ref: str) -> str:
    """A reference relative to the source folder (manifests must not hold this machine's paths)."""
    if ref.startswith(ZIP_PREFIX):
        zpath, _, member = ref[len(ZIP_PREFIX):].partition(".zip!")
        return f"{os.path.relpath(zpath + '.zip', root)}!{member}"
    return os.path.relpath(ref, root)


def _file_sha256(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def _clean(v: Any) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v if isinstance(v, (str, int)) else str(v)


def _ordered(df: pd.DataFrame, splits: np.ndarray, seed: int) -> list[int]:
    """Row positions in storage order: train shuffled by the seed, then val, then test by image_id."""
    order: list[int] = []
    for s in SPLITS:
        rows = np.flatnonzero(splits == s)  # df is sorted by image_id already
        if s == "train":
            rows = rows[np.random.default_rng([seed, 1]).permutation(len(rows))]
        order.extend(int(r) for r in rows)
    return order


def _feed(items: list[str], limit: threading.Semaphore, stop: threading.Event) -> Iterator[str]:
    # Runs in the pool's task-handler thread: blocks once `limit` images are ahead of the writer.
    for it in items:
        limit.acquire()
        if stop.is_set():
            return
        yield it


class _Shards:
    """Rolls shards per split at `shard_size`; temp name + fsync + rename for every shard."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.writer: ShardWriter | None = None
        self.split = ""
        self.count: Counter[str] = Counter()
        self.done: list[dict[str, Any]] = []

    def add(self, split_name: str, key: str, comps: list[tuple[str, bytes]]) -> None:
        w = self.writer
        size = sum(member_bytes(len(d)) for _, d in comps)
        if w is not None and (split_name != self.split or archive_bytes(w.pos + size) > self.shard_size):
            self.close()
        if self.writer is None:
            self.split = split_name
            name = f"{split_name}-{self.count[split_name]:06d}.tar"
            self.count[split_name] += 1
            self.writer = ShardWriter(self.out / f".{name}.tmp")
        self.writer.add(key, comps)

    def close(self) -> None:
        w, self.writer = self.writer, None
        if w is None:
            return
        name = w.path.name[1:-len(".tmp")]
        nbytes, sha = w.close()
        idx = index_text(w.samples).encode()
        final = self.out / name
        atomic_write_bytes(index_path_for(final), idx)
        os.replace(w.path, final)
        self.done.append({"name": name, "split": self.split, "samples": len(w.samples), "bytes": nbytes,
                          "sha256": sha, "index": index_path_for(final).name,
                          "index_sha256": hashlib.sha256(idx).hexdigest()})
        fire("pack.shard_done", split=self.split, shard=name, done=len(self.done))

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _encoder() -> dict[str, str | None]:
    from PIL import __version__ as pillow
    from PIL import features
    return {"pillow": pillow, "libjpeg_turbo": features.version("libjpeg_turbo")}


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0}
    a = np.asarray(values, np.int64)
    return {"min": int(a.min()), "max": int(a.max()), "mean": round(float(a.mean()), 2)}


def _progress(total: int, enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    return Progress(TextColumn("[bold]packing"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _recipe(cfg: PackConfig, src: Any, method: str) -> dict[str, Any]:
    """Everything the pack's bytes depend on (and nothing else: no paths, times or worker counts)."""
    return {
        "format": FORMAT, "version": VERSION, "classes": list(CLASSES),
        "source": {"layout": str(src.layout), "metadata_files": [f.name for f in src.metadata_files],
                   "metadata_sha256": src.metadata_sha256, "images": len(src.df), "missing": list(src.missing),
                   "excluded": list(src.skipped)},
        "split": {"method": method, "seed": cfg.seed, "val": cfg.val, "test": cfg.test,
                  "split_file": Path(cfg.split_file).name if cfg.split_file else None,
                  "split_file_sha256": _file_sha256(cfg.split_file)},
        "image": {"size": cfg.size, "quality": cfg.quality, "keep_original": cfg.keep_original,
                  "max_pixels": cfg.max_pixels, "format": "baseline-jpeg", "subsampling": "4:2:0",
                  "resample": "lanczos"},
        "shard_size": cfg.shard_size, "skip_bad": cfg.skip_bad,
    }


@dataclass
class _Written:
    """What the streaming pass produced, for the manifest."""

    shards: list[dict[str, Any]]
    written: np.ndarray  # bool[N] per source row
    bad: list[tuple[int, str]]  # (row, reason), in row order
    conversions: Counter
    kept: int
    widths: list[int]
    heights: list[int]
    sizes: list[int]


def _write_samples(cfg: PackConfig, df: pd.DataFrame, splits: np.ndarray, out: Path,
                   progress: bool) -> _Written:
    """Process images in storage order and stream them into shards. With bad images and no
    --skip-bad it keeps decoding (to list every bad file) but stops writing."""
    order = _ordered(df, splits, cfg.seed)
    refs = df["image"].to_numpy()
    meta_rows = df[META_COLUMNS].to_dict("records")
    policy = ImagePolicy(cfg.size, cfg.quality, cfg.keep_original, cfg.max_pixels)
    shards = _Shards(out, cfg.shard_size)
    w = _Written([], np.zeros(len(df), bool), [], Counter(), 0, [], [], [])
    try:
        for pos, res in zip(order, _results([refs[i] for i in order], policy, cfg.workers, progress),
                            strict=True):
            if res.error is not None:
                w.bad.append((pos, res.error))
                continue
            if w.bad and not cfg.skip_bad:
                continue
            row = {k: _clean(v) for k, v in meta_rows[pos].items()}
            row.update(split=str(splits[pos]), width=res.width, height=res.height, orig_width=res.orig_width,
                       orig_height=res.orig_height, jpg_sha256=hashlib.sha256(res.jpeg).hexdigest())
            shards.add(row["split"], row["image_id"], [
                ("cls", str(CLASSES.index(row["dx"])).encode()), ("jpg", res.jpeg),
                ("json", json.dumps(row, separators=(",", ":"), allow_nan=False).encode())])
            w.written[pos] = True
            w.conversions.update(res.conversions)
            w.kept += res.kept_original
            w.widths.append(res.width)
            w.heights.append(res.height)
            w.sizes.append(len(res.jpeg))
    except BaseException:
        shards.abort()  # Ctrl-C: the temp shard stays behind for the rerun to clear
        raise
    if w.bad and not cfg.skip_bad:
        shards.abort()
    else:
        shards.close()
    w.bad.sort()
    w.shards = shards.done
    return w


def pack_dataset(cfg: PackConfig, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the pack described by `cfg`; returns the manifest. Raises PackError / SourceError /
    SplitError with a message naming the file and what to do."""
    # An FFCV export of this folder in progress rewrites manifest.json when it finishes: wait for
    # it, so it cannot put an old manifest back over the one this run writes.
    ffcv_dir = Path(cfg.out) / ffcv_record.DIR_NAME
    with ffcv_record.export_lock(ffcv_dir) if ffcv_dir.is_dir() else contextlib.nullcontext():
        return _pack_dataset(cfg, progress, log)


def _pack_dataset(cfg: PackConfig, progress: bool, log: Callable[[str], None] | None) -> dict[str, Any]:
    say = log or (lambda _msg: None)
    _check_config(cfg)
    src = load_source(cfg.source, allow_missing=cfg.allow_missing)
    df = src.df
    if df.empty:
        raise PackError(f"{cfg.source}: the source has no images to pack")
    if cfg.split_file:
        splits = split.read_split_file(cfg.split_file, df, ignore=set(src.missing))
        method = split.METHOD_FILE
    else:
        splits = split.assign_splits(df, cfg.val, cfg.test, cfg.seed)
        method = split.METHOD_GROUPED
    recipe = _recipe(cfg, src, method)
    recipe_sha = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    out = Path(cfg.out)
    state = packdir.prepare(out, recipe_sha, cfg.force)
    if state is packdir.OutState.COMPLETE:
        try:
            done = Pack(out)  # sizes only: a shard lost or cut since then means rebuilding
        except PackError as e:
            say(f"{out}: the pack with these options is damaged ({e}); rebuilding it")
        else:
            (out / packdir.MARKER).unlink(missing_ok=True)  # left if killed right after the manifest
            say(f"{out} is already a complete pack of this source with these options: nothing to do "
                f"(--force rebuilds it)")
            return done.manifest
    if state is packdir.OutState.RESUME:
        say(f"{out}: finishing an interrupted pack with the same options (starting it over)")
    packdir.clear(out)
    packdir.mark(out, recipe, recipe_sha)

    w = _write_samples(cfg, df, splits, out, progress)
    refs = df["image"].to_numpy()
    if w.bad and not cfg.skip_bad:
        packdir.clear(out)
        (out / packdir.MARKER).unlink(missing_ok=True)
        lines = [f"{_display_ref(src.root, refs[p])}: {why}" for p, why in w.bad]
        raise PackError(f"{len(w.bad)} image(s) in {src.root} cannot be packed:\n  " + "\n  ".join(lines) +
                        "\nReplace or remove them, or pass --skip-bad to leave them out (they are then "
                        "listed in the manifest). Nothing was packed.")
    if not w.written.any():
        raise PackError(f"{src.root}: every image was skipped as unreadable; nothing to pack")
    note = _not_resized_note(cfg.size, w.widths, w.heights)
    if note:
        say(note)
    manifest = dict(recipe)
    manifest.update({
        "recipe_sha256": recipe_sha,
        "shards": w.shards,
        "splits": split.summarize(df[w.written].reset_index(drop=True), splits[w.written]),
        # Model-input metadata (loaders/ingest/metadata.py): vocabularies and age statistics of the train split only.
        "metadata": fit_schema(df[w.written & (splits == "train")][list(FIELDS)].to_dict("records")).record(),
        "skipped": [{"image_id": str(df["image_id"].iat[p]), "file": _display_ref(src.root, refs[p]),
                     "reason": why} for p, why in w.bad],
        "converted": dict(sorted(w.conversions.items())),
        "kept_original": w.kept,
        # Re-encoded bytes are reproducible with the same encoder; another version may differ.
        "encoder": _encoder(),
        "stats": {"width": _stats(w.widths), "height": _stats(w.heights), "jpeg_bytes": _stats(w.sizes),
                  "total_bytes": int(sum(s["bytes"] for s in w.shards))},
    })
    packdir.finish(out, manifest_bytes(manifest))
    return manifest


def _results(refs: list[str], policy: ImagePolicy, workers: int, progress: bool) -> Iterator[_Result]:
    """Process every ref in order, with a progress bar; a process pool when workers > 1."""
    n = workers if workers > 0 else cpu_count()
    fn = functools.partial(_work, policy=policy)
    pool = None
    if n > 1:
        # Fork before the progress bar starts its refresh thread (forking a threaded process is unsafe).
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        # Workers ignore Ctrl-C: the parent alone handles it and terminates the pool (a worker dying
        # of KeyboardInterrupt mid-send leaves the pool's queues wedged).
        pool = ctx.Pool(n, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    inflight = max(64, 8 * CHUNK * n)
    limit, stop = threading.Semaphore(inflight), threading.Event()
    try:
        with _progress(len(refs), progress) as bar:
            task = bar.add_task("pack", total=len(refs), rate="-")
            stream = (map(fn, refs) if pool is None
                      else pool.imap(fn, _feed(refs, limit, stop), chunksize=CHUNK))
            for done, res in enumerate(stream, start=1):
                limit.release()
                yield res
                if done % 16 == 0 or done == len(refs):
                    speed = bar.tasks[0].speed
                    bar.update(task, completed=done, rate=f"{speed:,.0f}" if speed else "-")
    finally:
        if pool is not None:
            stop.set()
            for _ in range(inflight):  # unblock the feeder so terminate() can join its thread
                limit.release()
            pool.terminate()
            pool.join()


def _not_resized_note(size: int, widths: list[int], heights: list[int]) -> str | None:
    """Images are never upscaled: say so when --size is above some images' shorter side, since the
    pack then holds those smaller than it says and a loader at that size would upscale them."""
    short = [min(wh) for wh in zip(widths, heights, strict=True)]
    small = [s for s in short if s < size]
    if not small:
        return None
    return (f"warning: --size {size} is larger than the shorter side of {len(small)} of {len(short)} source "
            f"images ({max(small)} px at most): images are never upscaled, so these are stored at their own "
            f"size. To have every image resized to one size, pack at --size {min(short)} or less.")


def _check_config(cfg: PackConfig) -> None:
    problems = []
    if not cfg.source:
        problems.append("--source is required")
    if not cfg.out:
        problems.append("--out is required")
    if cfg.size < 16:
        problems.append(f"--size {cfg.size}: must be at least 16 pixels")
    if cfg.workers < 0:
        problems.append(f"--workers {cfg.workers}: must be >= 0 (0 = all cores)")
    if not 1 <= cfg.quality <= 100:
        problems.append(f"--quality {cfg.quality}: must be between 1 and 100")
    if cfg.shard_size < 64 * 1024:
        problems.append(f"--shard-size {cfg.shard_size} bytes: must be at least 64KB")
    if cfg.max_pixels < 1:
        problems.append("max_pixels must be positive")
    if cfg.split_file and not Path(cfg.split_file).is_file():
        problems.append(f"--split-file {cfg.split_file}: no such file")
    if problems:
        raise PackError("; ".join(problems))
