"""`hamengine synth`: write a synthetic HAM10000 (Kaggle layout) for demos, tests and benchmarks."""
from __future__ import annotations

import time

import click

from hamengine.commands.common import console, emit_json, fail, resolve_workers


def _parse_wh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 600x450")
    return w, h


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write (created; must be empty, a previous synth run with the same options, "
                   "or --force).")
@click.option("--n", "n", default=10015, show_default=True, type=int,
              help="Number of images (HAM10000 has 10,015); class proportions are scaled to it.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed: the same seed and options give byte-identical files.")
@click.option("--size", default="600x450", show_default=True,
              help="Image size WIDTHxHEIGHT (HAM10000 images are 600x450).")
@click.option("--workers", default=0, show_default=True, type=int,
              help="Processes drawing images; 0 = all cores. The output does not depend on it.")
@click.option("--masks", is_flag=True,
              help="Also write HAM10000_masks/<image_id>_mask.png, each image's binary lesion mask.")
@click.option("--force", is_flag=True,
              help="Replace the HAM10000 files of a non-empty --out (other files there are kept).")
@click.option("--realism", type=click.Choice(["light", "real"]), default="light", show_default=True,
              help="JPEG weight. light: quality 90, 4:2:0 (about 30 KB at 600x450; fast tests and demos). "
                   "real: encoded as HAM10000's originals are (quality 100, 4:4:4) with faint sensor grain, "
                   "about 270 KB at 600x450, so per-file decoding costs what it costs on the real download.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (counts, timing) on stdout.")
def synth(out: str, n: int, seed: int, size: str, workers: int, masks: bool, force: bool, realism: str,
          as_json: bool) -> None:
    """Write a synthetic HAM10000-shaped dataset: HAM10000_metadata.csv plus HAM10000_images_part_1/2,
    with HAM10000's class balance, several images per lesion and JPEGs whose class shows in the
    lesion's shape, border, colour and texture (the classes overlap, like real ones)."""
    from hamengine.loaders.ingest.synth import (  # lazy: torch (--help stays fast)
        synth_summary,
        synthesize,
    )

    wh = _parse_wh(size)
    if workers < 0:
        fail(f"--workers {workers} must be >= 0 (0 = all cores)")
    nworkers = resolve_workers(workers)
    start = time.perf_counter()
    try:
        path = synthesize(out, n=n, seed=seed, size=wh, workers=nworkers, progress=True, masks=masks,
                          force=force, realism=realism)
    except OSError as e:  # disk full, permissions: nothing is marked complete, rerun resumes
        fail(f"cannot write the synthetic dataset to {out}: {e.strerror or e} ({e.filename or out}); "
             f"fix that and rerun the same command to resume")
    seconds = time.perf_counter() - start
    summary = synth_summary(path)
    summary.update(workers=nworkers, seconds=round(seconds, 2),
                   images_per_s=round(summary["images"] / seconds, 1) if seconds > 0 else None)
    if as_json:
        emit_json(summary)
        return
    counts = ", ".join(f"{dx} {c}" for dx, c in summary["classes"].items())
    console.print(f"wrote {summary['images']} images of {summary['lesions']} lesions to {path} "
                  f"in {seconds:.1f} s ({summary['images_per_s']} img/s, {nworkers} workers)\n{counts}",
                  highlight=False)
