"""`hamengine export-ffcv`: parse options and delegate to hamengine.loaders.ffcv.export."""
from __future__ import annotations

import time
from pathlib import Path

import click

from hamengine.commands.common import console, emit_json, err_console, fail


@click.command("export-ffcv")
@click.argument("pack_dir", metavar="PACK", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["jpg", "raw", "proportion"]), default="jpg", show_default=True,
              help="FFCV write mode. jpg: the pack's JPEG bytes as stored (PACK/ffcv/, what --loader ffcv "
                   "reads). raw: the resident cache's decoded pixels for output side --size (PACK/ffcv-raw-S/): "
                   "the same pixels the resident loader reads. proportion: FFCV's mix, each image "
                   "JPEG-encoded by FFCV with probability 0.5, else raw (PACK/ffcv-proportion/).")
@click.option("--size", type=click.IntRange(8), default=None,
              help="--mode raw: the output side S the loaders will produce (the cache's shorter side).")
@click.option("--force", is_flag=True, help="Rewrite the export even when it is up to date with the pack.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the export record (as stored in PACK/manifest.json under exports.<name>) as JSON on stdout.")
def export_ffcv(pack_dir: Path, mode: str, size: int | None, force: bool, as_json: bool) -> None:
    """Export PACK to FFCV: PACK/<name>/<split>.beton per split (labels and order as the pack's),
    recorded with each file's sha256 in PACK/manifest.json under `exports.<name>` (the pack's
    fingerprint does not change). Each mode is its own export. Needs the `ffcv` extra."""
    from hamengine.loaders.ffcv.export import (
        export_ffcv as run_export,  # lazy: torch (--help stays fast)
    )
    from hamengine.loaders.ffcv.export import export_name  # lazy: torch (--help stays fast)

    if size is not None and mode != "raw":
        fail("--size applies to --mode raw only (jpg and proportion store the pack's own resolution)", 2)
    name = export_name(mode, size)
    try:
        start = time.perf_counter()
        record = run_export(pack_dir, force=force, progress=not as_json, mode=mode, size=size,
                             log=None if as_json else lambda m: err_console.print(m, highlight=False))
        seconds = time.perf_counter() - start
    except KeyboardInterrupt:
        fail(f"interrupted: the export in {pack_dir / name} is incomplete; run the same command again", 130)
    if as_json:
        emit_json({**record, "out": str(pack_dir / name), "seconds": round(seconds, 2)})
        return
    for split, info in record["splits"].items():
        console.print(f"{split}: {info['file']}  {info['samples']} samples  {info['bytes'] / 1e6:,.1f} MB  "
                      f"sha256 {info['sha256'][:16]}", highlight=False)
    console.print(f"{seconds:.1f} s", highlight=False)

