"""`hamengine pack`, `verify`, `inspect`: parse options and delegate to hamengine.loaders."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress
from rich.table import Table

from hamengine.commands.common import console, emit_json, err_console, fail
from hamengine.config import CLASSES, MAX_PIXELS, SPLITS, PackConfig, parse_size


def split_table(splits: dict[str, Any], title: str) -> Table:
    """Class x split counts (with per-split share of the class), lesions and totals."""
    t = Table(title=title, title_justify="left")
    t.add_column("class")
    for s in SPLITS:
        t.add_column(s, justify="right")
    t.add_column("total", justify="right")
    for c in CLASSES:
        n = {s: splits[s]["classes"].get(c, 0) for s in SPLITS}
        total = sum(n.values())
        t.add_row(c, *(f"{n[s]} ({100 * n[s] / total:.1f}%)" if total else "0" for s in SPLITS), str(total))
    t.add_section()
    t.add_row("images", *(str(splits[s]["samples"]) for s in SPLITS),
              str(sum(splits[s]["samples"] for s in SPLITS)))
    t.add_row("lesions", *(str(splits[s]["lesions"]) for s in SPLITS),
              str(sum(splits[s]["lesions"] for s in SPLITS)))
    return t


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@click.command()
@click.option("--source", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="HAM10000 folder (Kaggle, Dataverse, ISIC 2018 or own-CSV layout; detected).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Pack folder to create (must be new, empty, an unfinished pack of the same command, "
                   "or replaced with --force).")
@click.option("--size", default=256, show_default=True, type=int,
              help="Shorter image side in pixels after resizing (never upscaled; 600x450 -> 341x256).")
@click.option("--quality", default=90, show_default=True, type=int, help="JPEG quality (1-100) of re-encoded images.")
@click.option("--keep-original", is_flag=True,
              help="Store source bytes unchanged when already baseline 8-bit RGB JPEG, upright and no larger "
                   "than --size (e.g. --size 450 keeps 600x450 originals).")
@click.option("--val", default=0.15, show_default=True, type=float, help="Fraction of images for validation.")
@click.option("--test", default=0.15, show_default=True, type=float, help="Fraction of images for test.")
@click.option("--split-file", type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with columns image_id,split (train/val/test) to reproduce a split instead of making one.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the split and the train order.")
@click.option("--shard-size", default="64MB", show_default=True,
              help="Target shard size (e.g. 64MB, 512KB); a shard holds at least one sample.")
@click.option("--workers", default=0, show_default=True, type=int,
              help="Image-processing processes; 0 = all cores. Output does not depend on it.")
@click.option("--skip-bad", is_flag=True,
              help="Leave out images that cannot be decoded (listed in the manifest) instead of failing.")
@click.option("--allow-missing", is_flag=True,
              help="Leave out metadata rows whose image file is missing instead of failing.")
@click.option("--force", is_flag=True,
              help="Replace an existing pack, or write into a non-empty folder (only pack files are removed).")
@click.option("--max-pixels", default=MAX_PIXELS, show_default=True, type=int,
              help="Reject images with more pixels than this (decompression-bomb guard).")
@click.option("--format", "formats", type=click.Choice(["webdataset", "ffcv"]), multiple=True,
              default=("webdataset",), show_default=True,
              help="Record formats to write. The webdataset shards are always written; `ffcv` also exports "
                   "PACK/ffcv/<split>.beton from them (same samples, labels and JPEG bytes; each file's sha256 "
                   "recorded in manifest.json under exports.ffcv; needs the ffcv extra).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def pack(source: Path, out: Path, size: int, quality: int, keep_original: bool, val: float, test: float,
         split_file: Path | None, seed: int, shard_size: str, workers: int, skip_bad: bool,
         allow_missing: bool, force: bool, max_pixels: int, formats: tuple[str, ...], as_json: bool) -> None:
    """Pack a HAM10000 folder into tar shards + DALI indexes + manifest (lesion-grouped, stratified split)."""
    from hamengine.loaders.pack.writer import (
        pack_dataset,  # lazy: torch (--help stays fast)
    )

    try:
        cfg = PackConfig(source=str(source), out=str(out), size=size, quality=quality,
                         keep_original=keep_original, val=val, test=test,
                         split_file=str(split_file) if split_file else None, seed=seed,
                         shard_size=parse_size(shard_size), workers=workers, skip_bad=skip_bad,
                         allow_missing=allow_missing, force=force, max_pixels=max_pixels)
        start = time.perf_counter()
        manifest = pack_dataset(cfg, progress=not as_json,
                                log=lambda m: err_console.print(m, highlight=False))
        ffcv_export = None
        if "ffcv" in formats:
            from hamengine.loaders.ffcv.export import (
                export_ffcv,  # lazy: torch (--help stays fast)
            )

            ffcv_export = export_ffcv(out, force=force, progress=not as_json,
                                      log=lambda m: err_console.print(m, highlight=False))
        seconds = time.perf_counter() - start
    except KeyboardInterrupt:
        fail(f"interrupted: {out} is not a complete pack; run the same command again to finish it", 130)
    total = manifest["stats"]["total_bytes"]
    summary = {"out": str(out), "seconds": round(seconds, 2), "recipe_sha256": manifest["recipe_sha256"],
               "shards": len(manifest["shards"]), "bytes": total, "splits": manifest["splits"],
               "converted": manifest["converted"], "kept_original": manifest["kept_original"],
               "skipped": manifest["skipped"], "missing": manifest["source"]["missing"],
               "ffcv": ffcv_export}
    if as_json:
        emit_json(summary)
        return
    console.print(split_table(manifest["splits"], f"{out} ({manifest['split']['method']} split)"))
    n = sum(manifest["splits"][s]["samples"] for s in SPLITS)
    console.print(f"{n} images in {len(manifest['shards'])} shards, {_mb(total)}; {seconds:.1f} s")
    if manifest["converted"]:
        console.print("converted: " + ", ".join(f"{k} {v}" for k, v in manifest["converted"].items()))
    if manifest["kept_original"]:
        console.print(f"kept original bytes: {manifest['kept_original']}")
    for s in manifest["skipped"]:
        console.print(f"[yellow]skipped[/] {s['file']}: {s['reason']}", highlight=False)
    if manifest["source"]["missing"]:
        console.print(f"[yellow]left out (image missing):[/] {len(manifest['source']['missing'])}")


@click.command()
@click.argument("pack_dir", metavar="PACK", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Check shard hashes and sample counts only (no decoding).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify(pack_dir: Path, quick: bool, as_json: bool) -> None:
    """Check every shard's sha256, index and sample (decode, label); exit 1 naming the first bad one."""

    from hamengine.loaders.pack.verify import verify_pack  # lazy: torch (--help stays fast)

    with Progress(console=err_console, disable=as_json, transient=True) as bar:
        task = bar.add_task("verifying shards", total=None)
        report = verify_pack(pack_dir, quick=quick, on_shard=lambda _s: bar.advance(task))
    if as_json:
        emit_json(report.to_dict())
    if report.fault:
        f = report.fault
        where = f.shard + (f", sample {f.index} ({f.sample})" if f.sample else "")
        fail(f"{pack_dir}: {where}: {f.message}")
    if not as_json:
        console.print(f"[green]ok[/] {pack_dir}: {report.shards} shards, {report.samples} samples "
                      f"({'hashes and counts' if quick else 'every sample decoded'})"
                      + (f"; exports {', '.join(report.exports)} match their sha256" if report.exports else ""),
                      highlight=False)


@click.command("inspect")
@click.argument("pack_dir", metavar="PACK", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def inspect_pack(pack_dir: Path, as_json: bool) -> None:
    """Show a pack: class x split table, lesions per split, image sizes, bytes."""
    from hamengine.loaders.pack.records import Pack  # lazy: torch (--help stays fast)

    p = Pack(pack_dir)
    m = p.manifest
    per_split = {s: {"shards": len(p.shards(s)), "bytes": sum(x.bytes for x in p.shards(s))} for s in SPLITS}
    info = {"pack": str(pack_dir), "fingerprint": p.fingerprint, "classes": list(p.classes),
            "image": m["image"], "split": m["split"], "source": {k: m["source"][k] for k in
                                                                 ("layout", "metadata_sha256", "images")},
            "splits": {s: {**m["splits"][s], **per_split[s]} for s in SPLITS}, "stats": m["stats"],
            "converted": m["converted"], "kept_original": m["kept_original"], "skipped": len(m["skipped"]),
            "exports": _exports_summary(p)}
    if as_json:
        emit_json(info)
        return
    console.print(split_table(m["splits"], f"{pack_dir}  (fingerprint {p.fingerprint[:12]})"))
    st = m["stats"]
    console.print(f"images: {st['width']['min']}-{st['width']['max']} x {st['height']['min']}-"
                  f"{st['height']['max']} px (mean {st['width']['mean']:.0f}x{st['height']['mean']:.0f}), "
                  f"JPEG {st['jpeg_bytes']['mean'] / 1e3:.1f} kB mean; quality {m['image']['quality']}, "
                  f"shorter side {m['image']['size']}")
    console.print("bytes: " + ", ".join(f"{s} {_mb(per_split[s]['bytes'])} in {per_split[s]['shards']} "
                                        f"shard(s)" for s in SPLITS) + f"; total {_mb(st['total_bytes'])}")
    console.print(f"source: {m['source']['layout']} layout, {m['source']['images']} images; split "
                  f"{m['split']['method']} seed {m['split']['seed']}; skipped {len(m['skipped'])}, "
                  f"converted {sum(m['converted'].values())}")
    for kind, splits in info["exports"].items():
        console.print(f"export {kind}: " + (", ".join(f"{v['file']} ({v['samples']} samples, {_mb(v['bytes'])})"
                                                      for v in splits.values()) if splits is not None else
                                            "a record this version cannot read (`hamengine verify` says more)"),
                      highlight=False)


def _exports_summary(pack) -> dict:
    """{kind: {split: file, samples, bytes, sha256}} of the exports the manifest records (None for a
    record this version cannot read); {} when none."""
    from hamengine.loaders.pack.ffcv_record import (  # lazy: torch (--help stays fast)
        DIR_NAME,
        recorded_export,
        valid_record,
    )

    record = recorded_export(pack.manifest)
    if record is None:
        return {}
    if not valid_record(record):
        return {DIR_NAME: None}
    return {DIR_NAME: {s: {k: v[k] for k in ("file", "samples", "bytes", "sha256")} for s, v in record["splits"].items()}}
