"""Run reports: the terminal metrics table, RUN/report.md and a self-contained RUN/report.html."""
from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table


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
             f"({ev.get('checkpoint', '')}, TTA {ev.get('tta', 'none')}, T={ev.get('temperature', 1.0):.3g})")
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
