"""Run reports: the terminal metrics table, RUN/report.md and a self-contained RUN/report.html."""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from hamengine.config import CLASS_NAMES
from hamengine.engine.runtime.run import RunDir, RunError, check_split
from hamengine.fileio import atomic_write_bytes


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(m: dict[str, Any], key: str) -> str:
    ci = (m.get("ci") or {}).get(key)
    if not ci or ci[0] is None:
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def summary_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("balanced accuracy", _f(m["balanced_accuracy"]) + _ci(m, "balanced_accuracy")),
            ("macro AUC", _f(m["macro_auc"]) + _ci(m, "macro_auc")),
            ("weighted AUC", _f(m["weighted_auc"])), ("accuracy", _f(m["accuracy"])),
            ("macro F1", _f(m["macro_f1"])),
            ("melanoma sensitivity @ 80% / 90% specificity",
             f"{_f(m['mel_sensitivity_at_80_spec'])} / {_f(m['mel_sensitivity_at_90_spec'])}"),
            ("ECE (15 bins) / NLL / Brier", f"{_f(m['ece'], 4)} / {_f(m['nll'], 4)} / {_f(m['brier'], 4)}"),
            ("images", str(m["n"]))]
    if m.get("auc_excluded"):
        rows.append(("AUC undefined (class absent)", ", ".join(m["auc_excluded"])))
    return rows


def per_class_rows(m: dict[str, Any]) -> list[list[str]]:
    return [[dx, _f(v["precision"]), _f(v["recall"]), _f(v["specificity"]), _f(v["f1"]), _f(v["auc"]),
             str(v["support"])] for dx, v in m["per_class"].items()]


PER_CLASS_HEADER = ["class", "precision", "recall", "specificity", "F1", "AUC", "support"]


def metrics_table(m: dict[str, Any]) -> Group:
    """Per-class table and summary table (95% CIs by lesion bootstrap when computed)."""
    ev = m.get("eval", {})
    title = (f"{ev.get('run', '')} {ev.get('model', '')} on {ev.get('split', '')} "
             f"({ev.get('checkpoint', '')}, TTA {ev.get('tta', 'none')}, T={ev.get('temperature', 1.0):.3g}"
             f"{', decision ' + ev['decision'] if ev.get('decision') == 'val-bias' else ''})")
    per = Table(title=title.strip())
    for h in PER_CLASS_HEADER:
        per.add_column(h, justify="left" if h == "class" else "right")
    for row in per_class_rows(m):
        per.add_row(*row)
    summary = Table(show_header=False, caption="[95% CI, resampling lesions]" if m.get("ci") else None)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for name, value in summary_rows(m):
        summary.add_row(name, value)
    return Group(per, summary)


# ---------------------------------------------------------------- report.md / report.html

@dataclass
class Block:
    """One piece of the report, rendered to both Markdown and HTML."""

    kind: str  # h1, h2, p, ul, table, img, code
    text: str = ""
    items: list[str] | None = None
    header: list[str] | None = None
    rows: list[list[str]] | None = None
    path: Path | None = None  # img


def _md(blocks: list[Block], root: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}\n")
        elif b.kind == "h2":
            out.append(f"## {b.text}\n")
        elif b.kind == "p":
            out.append(b.text + "\n")
        elif b.kind == "ul":
            out.append("\n".join(f"- {i}" for i in b.items or []) + "\n")
        elif b.kind == "table":
            out.append("| " + " | ".join(b.header or []) + " |")
            out.append("|" + "---|" * len(b.header or []))
            out += ["| " + " | ".join(r) + " |" for r in b.rows or []]
            out.append("")
        elif b.kind == "img" and b.path is not None:
            out.append(f"![{b.text}]({b.path.relative_to(root).as_posix()})\n")
        elif b.kind == "code":
            out.append(f"```json\n{b.text}\n```\n")
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """The little Markdown the blocks use (**bold**, `code`) as HTML."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_md(b.text)}</p>")
        elif b.kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in b.items or []) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header or [])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                           for r in b.rows or [])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "img" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode()  # self-contained: no file links
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.text)}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f5f5f5;padding:1em;overflow:auto;font-size:12px}figcaption{color:#666}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pack_manifest(cfg: dict[str, Any], m: dict[str, Any] | None) -> dict[str, Any] | None:
    for ref in ((m or {}).get("eval", {}).get("pack"), cfg.get("pack")):
        if ref:
            man = _load(Path(ref) / "manifest.json")
            if man:
                return man
    return None


LIMITATIONS = [
    "Research software. **Not a medical device**; not validated for diagnosis, screening or triage, and "
    "must not be used to make clinical decisions.",
    "HAM10000 comes from two centres (Vienna, Queensland); skin types are mostly light, images are "
    "dermoscopic only. Expect lower accuracy on other populations, cameras and clinical photographs.",
    "Classes are imbalanced (nv is about two thirds of HAM10000); rare classes (df, vasc) have few test "
    "lesions, so their recall and AUC are uncertain: read the confidence intervals.",
    "Splits are grouped by lesion_id, but about 18 duplicate image pairs are not caught by lesion_id.",
    "Calibration (temperature scaling) was fitted on the validation split and holds for data like it; "
    "it does not survive distribution shift.",
    "A model trained on synthetic data (`hamengine synth`) says nothing about real lesions: its metrics "
    "test the software, not medicine.",
]


def build_blocks(run: Path, split: str = "test") -> tuple[list[Block], list[str]]:
    from hamengine.engine.train.plots_train import plot_curves  # lazy: matplotlib only when a figure is drawn

    warnings: list[str] = []
    rd = RunDir(run)
    cfg = _load(rd.config_path) or {}
    env = rd.read_env()
    m = _load(rd.eval_metrics_path(split))
    rows = rd.read_metrics()
    model = cfg.get("model") or (m or {}).get("eval", {}).get("model") or "unknown"
    b: list[Block] = [Block("h1", f"Run report: {run.name} ({model})")]
    facts = [f"model: `{model}`, input {cfg.get('size', '?')} px, pretrained: {cfg.get('pretrained', '?')}",
             f"pack: `{Path(str(cfg.get('pack', '?'))).name}`",
             f"epochs trained: {len(rows)}" + (f" of {cfg['epochs']}" if cfg.get("epochs") else "")]
    best = [r for r in rows if r.get("best")]
    if best:
        facts.append(f"best epoch {best[-1]['epoch']}: val balanced accuracy "
                     f"{_f(best[-1].get('val_balanced_accuracy'))}")
    b.append(Block("ul", items=facts))

    b.append(Block("h2", f"Evaluation on {split}"))
    if m is None:
        warnings.append(f"no {rd.eval_metrics_path(split)}: run `hamengine eval {run} --split {split}`")
        b.append(Block("p", f"Not evaluated yet: run `hamengine eval RUN --split {split}`."))
    else:
        ev = m.get("eval", {})
        b.append(Block("p", f"Checkpoint `{ev.get('checkpoint', '?')}` (epoch {ev.get('epoch', '?')}), TTA "
                            f"`{ev.get('tta', 'none')}`, temperature {ev.get('temperature', 1.0):.3g}; "
                            f"{m['n']} images. Intervals: 95% bootstrap resampling lesions "
                            f"({(m.get('ci') or {}).get('n_boot', 0)} replicates)."))
        # Whether the model saw patient metadata (age, sex, site) beside the pixels; older runs: image only.
        b.append(Block("p", f"Metadata: {ev.get('metadata', 'not used (image only)')}."))
        b.append(Block("table", header=["metric", "value"], rows=[list(r) for r in summary_rows(m)]))
        b.append(Block("table", header=PER_CLASS_HEADER, rows=per_class_rows(m)))
        cal = m.get("calibration")
        if cal and "ece_before" in cal:
            b.append(Block("p", f"Temperature scaling (fitted on val): T = {cal['temperature']:.3f}; ECE "
                                f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f}, NLL {cal['nll_before']:.4f} "
                                f"-> {cal['nll_after']:.4f}."))
        bias = ev.get("class_bias")
        if bias:  # stated next to T: the decision is no longer the plain argmax
            b.append(Block("p", "Per-class decision biases fitted on val (maximizing val balanced accuracy) "
                                "are applied: softmax(log(p) / T + b) with b = " +
                                ", ".join(f"{k} {float(v):+.2f}" for k, v in bias.items()) + "."))
        for key, caption in (("confusion_matrix", "Confusion matrix (counts, row-normalized)"),
                             ("roc", "ROC curves, one vs rest"), ("reliability", "Reliability diagram"),
                             ("confidence_hist", "Confidence of correct vs wrong predictions"),
                             ("mistakes", "Most confident mistakes"),
                             ("correct", "Correct predictions per class")):
            p = rd.eval_dir(split) / f"{key}.png"
            if p.is_file():
                b.append(Block("img", caption, path=p))

    b.append(Block("h2", "Training curves"))
    curves = rd.plots / "curves.png"
    if not curves.is_file() and rows:
        plot_curves(rows, curves, title=f"{model} - {run.name}")
    if curves.is_file():
        b.append(Block("img", "Loss, validation metrics and throughput per epoch", path=curves))
    else:
        warnings.append(f"no training curves ({rd.metrics_path} is missing)")
        b.append(Block("p", "No metrics.jsonl in this run."))

    b += model_card(run, cfg, m, _pack_manifest(cfg, m))
    b.append(Block("h2", "Configuration"))
    b.append(Block("code", json.dumps(cfg, indent=2)))
    b.append(Block("h2", "Environment"))
    b.append(Block("code", json.dumps(env, indent=2) if env else "env.json missing"))
    return b, warnings


def model_card(run: Path, cfg: dict[str, Any], m: dict[str, Any] | None, manifest: dict[str, Any] | None
               ) -> list[Block]:
    b = [Block("h2", "Model card"),
         Block("p", "**Intended use**: research on skin-lesion classification and on fast training "
                    "pipelines; education. **Not a medical device.** Out of scope: any clinical use."),
         Block("p", "**Classes**: " + "; ".join(f"{k} = {v}" for k, v in CLASS_NAMES.items()) + ".")]
    if manifest:
        sp = manifest.get("split", {})
        data = [f"source layout `{manifest.get('source', {}).get('layout', '?')}`, "
                f"{manifest.get('source', {}).get('images', '?')} images; stored at "
                f"{manifest.get('image', {}).get('size', '?')} px (shorter side)",
                f"split: `{sp.get('method', '?')}` (seed {sp.get('seed', '?')}, val {sp.get('val', '?')}, "
                f"test {sp.get('test', '?')}); no lesion appears in two splits"]
        for name, info in (manifest.get("splits") or {}).items():
            data.append(f"{name}: {info.get('samples')} images, {info.get('lesions')} lesions, classes "
                        + ", ".join(f"{k} {v}" for k, v in (info.get("classes") or {}).items()))
        b += [Block("p", "**Data and split**"), Block("ul", items=data)]
    else:
        b.append(Block("p", f"**Data**: pack `{cfg.get('pack', '?')}` (manifest not found from here)."))
    if m is not None:
        b.append(Block("p", f"**Metrics** ({m.get('eval', {}).get('split', '?')}, {m['n']} images): balanced "
                            f"accuracy {_f(m['balanced_accuracy'])}{_ci(m, 'balanced_accuracy')}, macro AUC "
                            f"{_f(m['macro_auc'])}{_ci(m, 'macro_auc')}, melanoma sensitivity at 90% "
                            f"specificity {_f(m['mel_sensitivity_at_90_spec'])}."))
    b += [Block("p", "**Known limitations**"), Block("ul", items=LIMITATIONS)]
    return b


def write_report(run: str | Path, split: str = "test") -> dict[str, Any]:
    """RUN/report.md (figures linked) and RUN/report.html (figures embedded)."""

    check_split(split)
    rd = RunDir(run)
    if not rd.config_path.is_file():
        raise RunError(f"{rd.path}: not a run directory (no config.json)")
    blocks, warnings = build_blocks(rd.path, split)
    md = atomic_write_bytes(rd.report_md, _md(blocks, rd.path).encode())
    page = atomic_write_bytes(rd.report_html, _html(blocks, f"hamengine report {rd.path.name}").encode())
    return {"markdown": str(md), "html": str(page), "warnings": warnings}
