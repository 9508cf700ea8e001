"""Metadata readers for each HAM10000 layout: bytes -> one frame in our column names.

Every reader appends what is wrong to a `Problems` list instead of raising, so that one run reports
every problem of a download at once. Rows carry `_file`, `_row` (1-based data row) and `_line`
(line in the file, header = line 1) so later checks can name where a problem is.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hamengine.config import CLASSES, ISIC_COLUMNS

# The columns of SourceTable.df, in order.
COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization",
                            "dataset", "split", "image")
# Internal bookkeeping columns carried until validation is done.
WHERE: tuple[str, ...] = ("_file", "_row", "_line")
HINT = "_image_hint"  # OWN layout: the `image` column (path relative to the CSV), else None
REQUIRED: tuple[str, ...] = ("image_id", "lesion_id", "dx")
OPTIONAL: tuple[str, ...] = ("dx_type", "age", "sex", "localization", "dataset")
# ISIC LesionGroupings.diagnosis_confirm_type -> HAM10000 dx_type, so both layouts give one table.
ISIC_CONFIRM: dict[str, str] = {
    "histopathology": "histo",
    "serial imaging showing no change": "follow_up",
    "single image expert consensus": "consensus",
    "confocal microscopy with consensus dermoscopy": "confocal",
}
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (decoded with surrogateescape)
_MAX_DECODE_REPORTS = 50  # per file: a Latin-1 file would otherwise give a line per accented name


@dataclass
class Problems:
    """Problems found so far; `missing` holds the missing-image ones (allow_missing may skip them)."""

    items: list[tuple[str, int, str]] = field(default_factory=list)
    missing: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, file: str, msg: str, row: int | None = None, line: int | None = None,
            missing_image: bool = False) -> None:
        where = file if row is None else f"{file} row {row}" + (f" (line {line})" if line else "")
        (self.missing if missing_image else self.items).append((file, row or 0, f"{where}: {msg}"))

    def messages(self, include_missing: bool = True) -> list[str]:
        items = self.items + (self.missing if include_missing else [])
        return [m for _, _, m in sorted(items, key=lambda t: (t[0], t[1]))]

    def __bool__(self) -> bool:
        return bool(self.items or self.missing)


@dataclass
class Table:
    """One metadata file parsed as text: every cell a stripped str, column names lower-cased."""

    path: Path
    name: str  # as shown in messages (relative to the source root)
    data: bytes
    df: pd.DataFrame  # plus _file/_row/_line
    columns: list[str]


def _decode(data: bytes) -> tuple[str, list[int]]:
    """UTF-8 text (BOM dropped) and the byte offsets of every byte that is not UTF-8."""
    text = data.decode("utf-8", "surrogateescape")
    bad: list[int] = []
    offset, prev = 0, 0
    for m in _ESCAPED.finditer(text):  # one pass: offsets accumulate segment by segment
        offset += len(text[prev:m.start()].encode("utf-8", "surrogateescape"))
        bad.append(offset)
        offset += 1
        prev = m.end()
    if bad:
        text = _ESCAPED.sub("\ufffd", text)
    return text.removeprefix("\ufeff"), bad


def _delimiter(header: str) -> str:
    # Dataverse serves tab-separated `.tab` (or extension-less) files, Excel may write ';'.
    counts = {d: header.count(d) for d in (",", "\t", ";")}
    return max(counts, key=lambda d: (counts[d], d == ","))


def read_table(path: Path, name: str, problems: Problems) -> Table | None:
    """Parse a CSV/TSV metadata file; None (with problems recorded) when nothing usable is in it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.add(name, f"cannot be read ({e.strerror or e})")
        return None
    if not data.strip():
        problems.add(name, "is empty (expected a header line and one row per image)")
        return None
    text, bad = _decode(data)
    lines = text.splitlines()
    header_line = next((ln for ln in lines if ln.strip()), "")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(header_line))
    header: list[str] | None = None
    rows: list[list[str]] = []
    starts: list[int] = []  # line where each data row starts
    prev_line = 0
    for record in reader:
        start, prev_line = prev_line + 1, reader.line_num
        if not "".join(record).strip():
            continue  # blank line
        if header is None:
            header = [c.strip().lower() for c in record]
            continue
        if len(record) != len(header):
            extra = record[len(header):]
            if len(record) < len(header) or any(c.strip() for c in extra):
                problems.add(name, f"has {len(record)} fields, the header has {len(header)}",
                             row=len(rows) + 1, line=start)
            record = (record + [""] * len(header))[:len(header)]
        rows.append(record)
        starts.append(start)
    line_of = np.asarray(starts, dtype=np.int64)
    _report_decode(data, bad, line_of, name, problems)
    if header is None or not rows:
        problems.add(name, "has a header but no data rows" if header else "is empty")
        return None
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        problems.add(name, f"repeats column(s) {', '.join(dupes)} in its header")
    df = pd.DataFrame(rows, columns=range(len(header)), dtype=object)
    df = df.loc[:, ~pd.Index(header).duplicated()]
    df.columns = [c for i, c in enumerate(header) if c not in header[:i]]
    for c in df.columns:
        df[c] = df[c].str.strip()
    df["_file"] = name
    df["_row"] = np.arange(1, len(df) + 1)
    df["_line"] = line_of
    return Table(path, name, data, df, list(df.columns[:-3]))


def _report_decode(data: bytes, bad: list[int], line_of: np.ndarray, name: str, problems: Problems) -> None:
    if not bad:
        return
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)
    lines = np.searchsorted(nl, np.asarray(bad), side="left") + 1  # 1-based line of each offset
    seen: dict[int, int] = {}
    for off, ln in zip(bad, lines.tolist(), strict=True):
        if ln in seen:
            continue
        seen[ln] = off
        if len(seen) > _MAX_DECODE_REPORTS:
            break
        row = int(np.searchsorted(line_of, ln, side="right")) if len(line_of) else 0
        msg = (f"is not UTF-8 text: byte 0x{data[off]:02x} at byte offset {off} cannot be decoded "
               "(save the file as UTF-8)")
        if row >= 1:
            problems.add(name, msg, row=row, line=ln)
        else:
            problems.add(name, f"line {ln} {msg}")
    n_lines = len(set(lines.tolist()))
    if n_lines > _MAX_DECODE_REPORTS:
        problems.add(name, f"has {n_lines - _MAX_DECODE_REPORTS} more lines with bytes that are not UTF-8 "
                           "(save the file as UTF-8)")


def _require(table: Table, required: tuple[str, ...], problems: Problems) -> bool:
    missing = [c for c in required if c not in table.columns]
    if missing:
        problems.add(table.name, f"lacks required column(s) {', '.join(missing)} "
                                 f"(header has: {', '.join(table.columns) or 'nothing'})")
    return not missing


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in (*COLUMNS, *WHERE, HINT)})


def _finish(df: pd.DataFrame, src: pd.DataFrame) -> pd.DataFrame:
    """Add the bookkeeping columns and return the columns in a fixed order."""
    for c in WHERE:
        df[c] = src[c].to_numpy()
    for c in (*COLUMNS, HINT):
        if c not in df:
            df[c] = None
    return df[[*COLUMNS, *WHERE, HINT]]


def _text_or_none(s: pd.Series) -> pd.Series:
    return s.where(s != "", None).astype(object)


def ham_frame(table: Table, problems: Problems, own: bool = False) -> pd.DataFrame:
    """HAM10000 metadata (Kaggle / Dataverse) or our own CSV: same column names."""
    if not _require(table, REQUIRED, problems):
        return _empty_frame()
    src = table.df
    df = pd.DataFrame({c: src[c].to_numpy() for c in REQUIRED})
    for c in OPTIONAL:
        df[c] = _text_or_none(src[c]) if c in src else None
    if own and "split" in src:
        split = src["split"].str.lower()
        bad = ~split.isin(["", "train", "val", "test"])
        for i in np.flatnonzero(bad.to_numpy()):
            problems.add(table.name, f"split {src['split'].iat[i]!r} is not train, val, test or empty",
                         row=int(src["_row"].iat[i]), line=int(src["_line"].iat[i]))
        df["split"] = split.where(split.isin(["val", "test"]), None).astype(object)
    if own and "image" in src:
        df[HINT] = _text_or_none(src["image"])
    return _finish(df, src)


def isic_frame(gt: Table, groups: Table | None, split: str | None, problems: Problems,
               skipped: list[str]) -> pd.DataFrame:
    """ISIC 2018 Task 3 ground truth (one-hot) joined with its lesion groupings when given."""
    onehot_cols = tuple(c.lower() for c in ISIC_COLUMNS)
    if not _require(gt, ("image", *onehot_cols), problems):
        return _empty_frame()
    src = gt.df
    if "score_weight" in src:  # the official test truth lists one image with weight 0 and no file
        w = pd.to_numeric(src["score_weight"], errors="coerce")
        zero = (w == 0).to_numpy()
        skipped.extend(f"{i}: score_weight 0 in {gt.name}" for i in src["image"][zero])
        src = src[~zero]
    raw = src[list(onehot_cols)]
    vals = raw.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)  # [N, 7]
    not_binary = ~np.isin(vals, (0.0, 1.0))  # NaN included
    ones = (vals == 1.0).sum(axis=1)
    rows, lines = src["_row"].to_numpy(), src["_line"].to_numpy()
    for i in np.flatnonzero(not_binary.any(axis=1) | (ones != 1)):
        cells = ", ".join(f"{ISIC_COLUMNS[j]}={raw.iat[i, j]!r}" for j in np.flatnonzero(not_binary[i]))
        if cells:
            msg = f"one-hot values must be 0 or 1, got {cells}"
        else:
            hot = [ISIC_COLUMNS[j] for j in np.flatnonzero(vals[i] == 1.0)]
            msg = (f"one-hot row has {ones[i]} ones ({', '.join(hot) or 'none'}); "
                   "exactly one of MEL,NV,BCC,AKIEC,BKL,DF,VASC must be 1")
        problems.add(gt.name, msg, row=int(rows[i]), line=int(lines[i]))
    # Map each column to our class name; rows already reported get a dx that validation accepts.
    names = np.array([c.lower() for c in ISIC_COLUMNS], dtype=object)
    df = pd.DataFrame({"image_id": src["image"].to_numpy(), "dx": names[vals.argmax(axis=1) if len(vals) else []]})
    assert set(names) == set(CLASSES)
    df["lesion_id"] = df["image_id"]  # validation / test rows have no groupings: one image per lesion
    df["split"] = split
    if groups is not None and _require(groups, ("image", "lesion_id"), problems):
        g = groups.df
        dup = g["image"].duplicated().to_numpy()
        for i in np.flatnonzero(dup):
            problems.add(groups.name, f"image {g['image'].iat[i]!r} is listed twice",
                         row=int(g["_row"].iat[i]), line=int(g["_line"].iat[i]))
        g = g[~dup].set_index("image")
        lesion = df["image_id"].map(g["lesion_id"])
        for i in np.flatnonzero(lesion.isna().to_numpy()):
            problems.add(gt.name, f"image {df['image_id'].iat[i]!r} has no row in {groups.name}",
                         row=int(rows[i]), line=int(lines[i]))
        df["lesion_id"] = lesion.fillna(df["image_id"]).to_numpy()
        if "diagnosis_confirm_type" in g:
            confirm = df["image_id"].map(g["diagnosis_confirm_type"]).fillna("")
            mapped = confirm.str.lower().map(ISIC_CONFIRM)
            df["dx_type"] = _text_or_none(mapped.fillna(confirm))
    return _finish(df, src)
