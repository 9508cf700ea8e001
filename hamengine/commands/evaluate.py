"""`hamengine eval | predict | explain | compare | report`: parse options, delegate to hamengine.engine."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from hamengine.commands.common import CKPT_CHOICES, CKPT_HELP, TTA_CHOICES, TTA_HELP, console, emit_json, fail
from hamengine.config import PACK_LOADERS, TTA, CheckpointName, LoaderKind

RUN_ARG = click.Path(file_okay=False, path_type=Path)


@click.command("eval")
@click.argument("run", type=RUN_ARG)
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Pack split to evaluate.")
@click.option("--checkpoint", type=click.Choice(CKPT_CHOICES), default=None, help=CKPT_HELP)
@click.option("--tta", type=click.Choice(TTA_CHOICES), default=None, help=TTA_HELP)
@click.option("--fit-bias", is_flag=True,
              help="Fit per-class decision biases on val (maximizing val balanced accuracy), save them in "
                   "RUN/calibration.json and apply them here and in predict, serve and the ISIC CSV.")
@click.option("--calibrate", is_flag=True,
              help="Fit temperature scaling on val, report ECE before/after, save RUN/calibration.json "
                   "(used by predict and serve).")
@click.option("--boot", "n_boot", type=click.IntRange(0), default=1000, show_default=True,
              help="Bootstrap replicates (resampling lesions) for 95% intervals; 0 disables.")
@click.option("--pack", type=click.Path(file_okay=False), default=None,
              help="Pack folder to read (default: the pack recorded in RUN/config.json).")
@click.option("--unchecked-pack", is_flag=True,
              help="With --pack: evaluate on a pack other than the run's even when it cannot be checked for "
                   "the run's training images (the training pack is gone or was rebuilt).")
@click.option("--loader", type=click.Choice(list(PACK_LOADERS)), default="auto",
              show_default=True, help="Loader kind for the eval split.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Eval batch size.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-meta", is_flag=True, help="A --meta run: evaluate it with every metadata field unknown "
              "(how it does without metadata), into RUN/eval-<split>-no-meta/.")
@click.option("--no-plots", is_flag=True, help="Skip the figures (metrics and CSV files only).")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout instead of a table.")
def eval_run(run: Path, split: str, checkpoint: str | None, tta: str | None, fit_bias: bool, calibrate: bool, n_boot: int,
             pack: str | None, unchecked_pack: bool, loader: str, batch_size: int, device: str,
             no_meta: bool, no_plots: bool, as_json: bool) -> None:
    """Evaluate RUN on a pack split: metrics with lesion-bootstrap CIs, predictions.csv, an ISIC 2018
    Task 3 submission CSV and figures, all in RUN/eval-<split>/."""
    from hamengine.engine.evaluate.evaluator import (  # lazy: torch (--help stays fast)
        EvalOptions,
        evaluate_run,
    )
    from hamengine.engine.train.report import (
        metrics_table,  # lazy: torch (--help stays fast)
    )

    opts = EvalOptions(split=split, checkpoint=CheckpointName(checkpoint) if checkpoint else None,
                       tta=TTA(tta) if tta else None, calibrate=calibrate,
                       fit_bias=fit_bias, n_boot=n_boot, pack=pack, unchecked_pack=unchecked_pack, loader=LoaderKind(loader),
                       batch_size=batch_size,
                       device=device, plots=not no_plots, meta=not no_meta)
    m = evaluate_run(run, opts, progress=not as_json)
    if as_json:
        emit_json(m)
        return
    console.print(metrics_table(m))
    cal = m.get("calibration")
    if cal and "ece_before" in cal:
        console.print(f"temperature {cal['temperature']:.3f}: ECE {cal['ece_before']:.4f} -> "
                      f"{cal['ece_after']:.4f}, NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}")
    bias = m["eval"].get("class_bias")
    if bias:
        fit = m.get("decision_fit") or {}
        gain = (f" (val balanced accuracy {fit['val_balanced_accuracy_before']:.3f} -> "
                f"{fit['val_balanced_accuracy_after']:.3f})") if fit else ""
        console.print("decision: per-class biases fitted on val " +
                      " ".join(f"{k} {v:+.2f}" for k, v in bias.items()) + gain)
    console.print(f"outputs: {Path(m['outputs']['metrics']).parent}")


@click.command("predict")
@click.argument("run", type=RUN_ARG)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Choice(CKPT_CHOICES), default=None, help=CKPT_HELP)
@click.option("--tta", type=click.Choice(TTA_CHOICES), default=None, help=TTA_HELP)
@click.option("--top-k", type=click.IntRange(1, 7), default=3, show_default=True,
              help="Classes to list per image.")
@click.option("--age", default=None, help="Patient age in years, for every IMAGE (a --meta run only).")
@click.option("--sex", default=None, help="male, female or unknown, for every IMAGE (a --meta run only).")
@click.option("--site", default=None, help="Body site (HAM10000's localization: back, face, lower extremity, "
              "...; unknown), for every IMAGE (a --meta run only).")
@click.option("--meta-csv", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Per-image metadata: a CSV with an `image` column (path, file name or id) and any of age, "
                   "sex, localization (or site). Images it does not list predict without metadata.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (per-image results).")
def predict(run: Path, images: tuple[Path, ...], checkpoint: str | None, tta: str | None, top_k: int, age: str | None,
            sex: str | None, site: str | None, meta_csv: Path | None, device: str, as_json: bool) -> None:
    """Classify IMAGE files (JPEG/PNG, any size) with RUN. Unreadable files are reported and the
    others still predicted; the exit status is non-zero if any file failed. A run trained with
    --meta also takes the patient's age, sex and the body site (optional: what is left out counts
    as unknown)."""

    from hamengine.engine.evaluate.predict import (
        Predictor,  # lazy: torch (--help stays fast)
    )
    from hamengine.loaders.ingest.imaging import BadImage  # lazy: torch (--help stays fast)
    from hamengine.loaders.ingest.metadata import (
        read_meta_csv,  # lazy: torch (--help stays fast)
    )

    if meta_csv is not None and any(v is not None for v in (age, sex, site)):
        fail("give either --meta-csv or --age/--sex/--site, not both")
    meta = (read_meta_csv(meta_csv, images) if meta_csv is not None else
            [{"age": age, "sex": sex, "localization": site}] * len(images)
            if any(v is not None for v in (age, sex, site)) else None)
    predictor = Predictor(run, checkpoint=checkpoint, device=device, tta=tta)
    results = predictor.predict_files(list(images), meta)
    out, failed = [], 0
    for path, r in zip(images, results, strict=True):
        if isinstance(r, BadImage):
            failed += 1
            out.append({"image": str(path), "error": str(r)})
        else:
            out.append({"image": str(path), "top": predictor.top_k(r, top_k),
                        "probabilities": dict(zip(predictor.classes, map(float, r), strict=True))})
    if as_json:
        emit_json({"run": str(run), "model": predictor.model_name, "temperature": predictor.temperature,
                   "metadata": predictor.uses_metadata and meta is not None,
                   "decision": predictor.adjustment.decision, "class_bias": predictor.adjustment.class_bias,
                   "tta": str(predictor.tta), "results": out, "failed": failed})
    else:
        table = Table(title=f"{run.name} ({predictor.model_name}, T={predictor.temperature:.3g})")
        table.add_column("image")
        for k in range(top_k):
            table.add_column(f"#{k + 1}")
        for r in out:
            if "error" in r:
                table.add_row(Path(r["image"]).name, f"[red]error: {r['error']}[/]", *[""] * (top_k - 1))
            else:
                table.add_row(Path(r["image"]).name, *[f"{t['dx']} {t['probability']:.3f}\n[dim]{t['name']}[/]"
                                            for t in r["top"]])
        console.print(table)
    if failed:
        fail(f"{failed} of {len(images)} image(s) could not be read (listed above)")


@click.command("explain")
@click.argument("run", type=RUN_ARG)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for one PNG per image and contact_sheet.png.")
@click.option("--class", "dx", default=None,
              help="Explain this class (akiec, bcc, bkl, df, mel, nv, vasc) instead of the predicted one.")
@click.option("--checkpoint", type=click.Choice(CKPT_CHOICES), default=None, help=CKPT_HELP)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the written files and classes as JSON.")
def explain(run: Path, images: tuple[Path, ...], out: Path, dx: str | None, checkpoint: str | None, device: str,
            as_json: bool) -> None:
    """Grad-CAM overlays of RUN's decision for each IMAGE (the predicted class, or --class)."""
    from hamengine.engine.serve.gradcam import (
        explain_files,  # lazy: torch (--help stays fast)
    )

    res = explain_files(run, list(images), out, dx=dx, checkpoint=checkpoint, device=device)
    if as_json:
        emit_json(res)
    else:
        for r in res["images"]:
            msg = (f"[red]error: {r['error']}[/]" if "error" in r else
                   f"{r['explained']} (predicted {r['predicted']} {r['probability']:.3f}) -> {r['png']}")
            console.print(f"{r['image']}: {msg}")
        console.print(f"contact sheet: {res['contact_sheet']}")
    if res["failed"]:
        fail(f"{res['failed']} of {len(images)} image(s) could not be read")


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=RUN_ARG)
@click.option("--split", default="test", show_default=True, help="Evaluation split to compare (eval-<split>/).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for compare.png and compare.json (default: no files).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare(runs: tuple[Path, ...], split: str, out: Path | None, as_json: bool) -> None:
    """Compare evaluated RUNS side by side: balanced accuracy and macro AUC with 95% CIs, per-class
    recall, parameters, training img/s and wall time."""
    from hamengine.engine.evaluate.compare import (  # lazy: torch (--help stays fast)
        compare_runs,
        compare_table,
    )

    res = compare_runs(list(runs), split=split, out=out)
    if as_json:
        emit_json(res)
    else:
        console.print(compare_table(res))
        if out is not None:
            console.print(f"figure: {res['figure']}")


@click.command("report")
@click.argument("run", type=RUN_ARG)
@click.option("--split", default="test", show_default=True, help="Evaluation split to report (eval-<split>/).")
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
def report(run: Path, split: str, as_json: bool) -> None:
    """Write RUN/report.md and a self-contained RUN/report.html: curves, evaluation figures, config,
    environment and a model card."""
    from hamengine.engine.train.report import (
        write_report,  # lazy: torch (--help stays fast)
    )

    res = write_report(run, split=split)
    if as_json:
        emit_json(res)
    else:
        console.print(f"report: {res['markdown']}\n        {res['html']}")
        for w in res["warnings"]:
            console.print(f"[yellow]note:[/] {w}")
