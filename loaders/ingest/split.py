"""Train/val/test splits: lesion-grouped and stratified by diagnosis, or read from a file.

Why grouped: HAM10000 holds several images of one lesion; a random image-level split puts the same
lesion on both sides and inflates validation scores (REFERENCES.md, "Leakage").

Method (deterministic for a seed): every lesion is a group (an image without lesion_id is its own
group) labelled with its most frequent dx. Per class, groups are ordered largest first (ties in a
seeded random order) and each goes to the split whose image count is furthest below its target
(`fraction * class images`). Largest-first leaves the single-image groups for last, so the counts
land within a group's size of the targets: within 2 percentage points for classes of 100+ images.
ISIC 2018 validation/test rows (`split` column of the source table) are pinned to val/test first.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from hamengine.config import CLASSES, SPLITS
from hamengine.errors import UserError

METHOD_GROUPED = "lesion-grouped-stratified"
METHOD_FILE = "file"
MAX_LISTED = 20


class SplitError(UserError, ValueError):
    """The requested split cannot be made; str() lists every problem (file and row)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        super().__init__("\n  ".join([f"{len(problems)} problem(s) with the split:"] + shown) + more)


def group_keys(df: pd.DataFrame) -> pd.Series:
    """lesion_id, or the image_id for images without one (each is then its own lesion)."""
    lesion = df["lesion_id"].astype("object")
    missing = lesion.isna() | (lesion.astype(str).str.strip() == "")
    return lesion.where(~missing, "image:" + df["image_id"].astype(str)).astype(str)


def _pinned(df: pd.DataFrame, groups: pd.Series) -> dict[str, str]:
    """group -> split for groups holding ISIC validation/test rows."""
    pinned: dict[str, str] = {}
    problems = []
    if "split" not in df.columns:
        return pinned
    for g, s, image_id in zip(groups, df["split"], df["image_id"], strict=True):
        if s is None or (isinstance(s, float) and np.isnan(s)):
            continue
        if s not in ("val", "test"):
            problems.append(f"image {image_id}: source split {s!r} is not val or test")
        elif pinned.setdefault(g, s) != s:
            problems.append(f"lesion {g}: images in both ISIC {pinned[g]} and {s} (image {image_id})")
    if problems:
        raise SplitError(problems)
    return pinned


def assign_splits(df: pd.DataFrame, val: float, test: float, seed: int) -> np.ndarray:
    """One of SPLITS per row of `df` (columns image_id, lesion_id, dx[, split])."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise SplitError([f"--val {val} and --test {test} must each be in [0, 1) and sum to less than 1"])
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    groups = group_keys(df)
    pinned = _pinned(df, groups)
    table = pd.DataFrame({"group": groups.to_numpy(), "dx": df["dx"].astype(str).to_numpy()})
    sizes = table.groupby("group").size()
    # A group's class: its most frequent dx (ties: the first in CLASSES order, then alphabetical).
    order = {c: i for i, c in enumerate(CLASSES)}
    dx_counts = table.groupby(["group", "dx"]).size().reset_index(name="n")
    dx_counts["rank"] = dx_counts["dx"].map(lambda d: order.get(d, len(order)))
    dx_counts = dx_counts.sort_values(["group", "n", "rank", "dx"], ascending=[True, False, True, True])
    group_dx = dx_counts.drop_duplicates("group").set_index("group")["dx"]

    rng = np.random.default_rng(seed)
    group_split: dict[str, str] = dict(pinned)
    for dx in sorted(group_dx.unique(), key=lambda d: (order.get(d, len(order)), d)):
        names = sorted(group_dx.index[group_dx == dx])
        total = int(sizes[names].sum())
        target = {s: fractions[s] * total for s in SPLITS}
        count = dict.fromkeys(SPLITS, 0)
        for g in names:
            if g in pinned:
                count[pinned[g]] += int(sizes[g])
        free = [g for g in names if g not in pinned]
        free = [free[i] for i in rng.permutation(len(free))]  # seeded tie order
        free.sort(key=lambda g: -int(sizes[g]))  # stable: largest first, ties stay shuffled
        for g in free:
            # The split furthest below its target (ties: SPLITS order) takes the whole group.
            best = max(SPLITS, key=lambda s: (target[s] - count[s], -SPLITS.index(s)))
            group_split[g] = best
            count[best] += int(sizes[g])
    return groups.map(group_split).to_numpy(dtype=object)


def read_split_file(path: str | Path, df: pd.DataFrame, ignore: set[str] | None = None) -> np.ndarray:
    """Splits from a CSV with columns image_id,split. Every image of the source must be listed once;
    every problem is reported with its line number; no lesion may span two splits. Rows for ids in
    `ignore` (images left out with --allow-missing) are accepted and unused."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise SplitError([f"{p}: cannot read split file ({e})"]) from None
    if not rows:
        raise SplitError([f"{p}: empty split file; expected a header 'image_id,split'"])
    header = [h.strip().lower() for h in rows[0]]
    if "image_id" not in header or "split" not in header:
        raise SplitError([f"{p}, line 1: header {rows[0]!r} must name columns image_id and split"])
    ci, cs = header.index("image_id"), header.index("split")
    known = set(df["image_id"].astype(str))
    seen: dict[str, int] = {}
    split_of: dict[str, str] = {}
    problems: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(ci, cs):
            problems.append(f"{p}, line {line}: expected {len(header)} columns, got {len(row)}")
            continue
        image_id, split = row[ci].strip(), row[cs].strip().lower()
        if split not in SPLITS:
            problems.append(f"{p}, line {line}: split {row[cs]!r} is not one of {', '.join(SPLITS)}")
        if image_id in (ignore or ()):
            continue
        if image_id not in known:
            problems.append(f"{p}, line {line}: image_id {image_id!r} is not in the source metadata")
        elif image_id in seen:
            problems.append(f"{p}, line {line}: image_id {image_id} listed again (first on line {seen[image_id]})")
        else:
            seen[image_id] = line
            if split in SPLITS:
                split_of[image_id] = split
    unlisted = sorted(known - set(seen))
    if unlisted:
        problems.append(f"{p}: {len(unlisted)} image(s) of the source are not listed, e.g. "
                        f"{', '.join(unlisted[:5])}")
    if problems:
        raise SplitError(problems)
    out = df["image_id"].astype(str).map(split_of).to_numpy(dtype=object)
    check_grouping(df, out, where=str(p))
    return out


def check_grouping(df: pd.DataFrame, splits: np.ndarray, where: str = "split") -> None:
    """Raise SplitError naming every lesion that lands in more than one split."""
    table = pd.DataFrame({"group": group_keys(df).to_numpy(), "split": splits,
                          "image_id": df["image_id"].to_numpy()})
    spread = table.groupby("group")["split"].nunique()
    problems = []
    for g in spread.index[spread > 1]:
        rows = table[table["group"] == g]
        parts = ", ".join(f"{i} in {s}" for i, s in zip(rows["image_id"], rows["split"], strict=True))
        problems.append(f"{where}: lesion {g} is in more than one split ({parts}); "
                        f"keep a lesion's images together")
    if problems:
        raise SplitError(problems)


def summarize(df: pd.DataFrame, splits: np.ndarray) -> dict[str, dict]:
    """{split: {samples, lesions, classes: {dx: n}}} with every split and class present (stable JSON)."""
    groups = group_keys(df).to_numpy()
    dx = df["dx"].astype(str).to_numpy()
    out = {}
    for s in SPLITS:
        mask = splits == s
        counts = {c: int(np.sum(dx[mask] == c)) for c in CLASSES}
        out[s] = {"samples": int(mask.sum()), "lesions": int(len(set(groups[mask]))), "classes": counts}
    return out
