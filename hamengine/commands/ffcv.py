"""`hamengine export-ffcv`: parse options and delegate to hamengine.loaders.ffcv_export."""
from __future__ import annotations

import time
from pathlib import Path

import click

from hamengine.commands.common import console, emit_json, err_console, fail


@click.command("export-ffcv")
@click.argument("pack_dir", metavar="PACK", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Rewrite the export even when it is up to date with the pack.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the export record (as stored in PACK/manifest.json under exports.ffcv) as JSON on stdout.")
def export_ffcv(pack_dir: Path, force: bool, as_json: bool) -> None:
    """Export PACK to FFCV: PACK/ffcv/<split>.beton per split (the pack's JPEG bytes, labels and
    order), recorded with each file's sha256 in PACK/manifest.json under `exports.ffcv` (the pack's
    fingerprint does not change). Needs the `ffcv` extra."""
    from hamengine.loaders.ffcv_export import DIR_NAME
    from hamengine.loaders.ffcv_export import export_ffcv as run_export
    try:
        start = time.perf_counter()
        record = run_export(pack_dir, force=force, progress=not as_json,
                             log=None if as_json else lambda m: err_console.print(m, highlight=False))
        seconds = time.perf_counter() - start
    except KeyboardInterrupt:
        fail(f"interrupted: the export in {pack_dir / DIR_NAME} is incomplete; run the same command again", 130)
    if as_json:
        emit_json({**record, "out": str(pack_dir / DIR_NAME), "seconds": round(seconds, 2)})
        return
    for split, info in record["splits"].items():
        console.print(f"{split}: {info['file']}  {info['samples']} samples  {info['bytes'] / 1e6:,.1f} MB  "
                      f"sha256 {info['sha256'][:16]}", highlight=False)
    console.print(f"{seconds:.1f} s", highlight=False)

