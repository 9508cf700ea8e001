"""Source ingest: read a HAM10000 download into one validated table, whatever its layout.

Recognized without being told (see `detect`): Kaggle (HAM10000_metadata.csv + image folders),
Harvard Dataverse (tab-separated metadata, images in folders or still in the part zips, read lazily),
ISIC 2018 Task 3 (one-hot ground truth + lesion groupings + input folders, validation/test too) and
our own CSV (image_id, lesion_id, dx, ...). Bad input raises ONE SourceError listing every problem
with its file and row, so a user fixes a download in one round instead of one error per run.

Speed: one directory walk finds every image (existence is never checked per file); checks are
vectorised over the table, so 10,015 rows ingest in well under a second.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hamengine.config import CLASSES, StrEnum
from hamengine.errors import UserError
from hamengine.loaders.ingest.layouts import COLUMNS, HINT, Problems, ham_frame, isic_frame, read_table

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
ZIP_PREFIX = "zip://"
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]+")  # becomes a tar member / file name: nothing else is safe
_HAM_META = ("ham10000_metadata.csv", "ham10000_metadata", "ham10000_metadata.tab",
             "ham10000_metadata.tsv", "ham10000_metadata.txt")
_HAM_IMAGE_DIR = re.compile(r"ham10000_images_part_\d+")
_ISIC_GT = "isic2018_task3_{}_groundtruth.csv"
_ISIC_GROUPS = "isic2018_task3_{}_lesiongroupings.csv"
_ISIC_INPUT = ("isic2018_task3_{}_input", "isic2018_task3_{}_images")  # folder or .zip
_ISIC_SPLITS = (("training", None), ("validation", "val"), ("test", "test"))
_OWN_EXTS = (".csv", ".tsv", ".tab")
_NA_TOKENS = ("", "na", "nan", "n/a", "null", "none")


class Layout(StrEnum):
    KAGGLE = "kaggle"
    DATAVERSE = "dataverse"
    ISIC2018 = "isic2018"
    OWN = "own"


class SourceError(UserError):
    """A source folder that cannot be used; str(e) lists every problem, each with file and row."""

    def __init__(self, problems: list[str], root: Path | str | None = None, hint: str = ""):
        self.problems = list(problems)
        self.root = root
        n = len(self.problems)
        head = (f"{root}: " if root else "") + f"{n} problem{'s' if n != 1 else ''} in the HAM10000 source"
        head += " (row = 1-based data row; line = line in the file, header = line 1):"
        text = "\n".join([head, *(f"  - {p}" for p in self.problems)])
        super().__init__(text + (f"\n{hint}" if hint else ""))


@dataclass
class SourceTable:
    """One validated table per download. df: COLUMNS, sorted by image_id, index 0..N-1."""

    root: Path
    layout: Layout
    df: pd.DataFrame
    metadata_files: list[Path]
    metadata_sha256: str
    missing: list[str] = field(default_factory=list)  # image_ids left out (allow_missing=True)
    skipped: list[str] = field(default_factory=list)  # "image_id: reason" for rows the source excludes


# ---------------------------------------------------------------------------------------------- files
def _walk(root: Path) -> list[str]:
    """Every regular file below root (followed symlinks once; hidden and macOS zip debris skipped)."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        d = stack.pop()
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or the same folder linked twice
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(".") or e.name == "__MACOSX":
                continue
            try:
                if e.is_dir():
                    stack.append(e.path)
                elif e.is_file():
                    out.append(e.path)
            except OSError:  # dangling link
                continue
    out.sort()
    return out


def _rel(root: Path, path: str | Path) -> str:
    path, top = str(path), str(root) + os.sep
    # every walked path starts with root: slicing is ~20x cheaper than relpath over 10k images
    return path[len(top):] if path.startswith(top) else os.path.relpath(path, root)


def _depth(root: Path, path: str) -> int:
    return _rel(root, path).count(os.sep)


def _shallowest(root: Path, files: list[str], names: tuple[str, ...]) -> list[str]:
    """Files named (any case) one of `names`, only those at the smallest depth, in names order."""
    hits = [f for f in files if os.path.basename(f).lower() in names]
    if not hits:
        return []
    top = min(_depth(root, f) for f in hits)
    hits = [f for f in hits if _depth(root, f) == top]
    return sorted(hits, key=lambda f: (names.index(os.path.basename(f).lower()), f))


def _image_index(root: Path, files: list[str], in_scope, zips: list[str],
                 problems: Problems) -> dict[str, str]:
    """image stem -> reference. Several copies (a duplicated folder, zip + extracted folder) collapse
    into one: preferred folder first, then plain files before zip members, then shallow, then name."""
    cand: list[tuple[str, tuple, str]] = []
    ranks: dict[str, int | None] = {}  # per folder, not per image
    for f in files:
        folder, _, base = f.rpartition(os.sep)
        stem, ext = os.path.splitext(base)
        if ext.lower() not in IMAGE_EXTS:
            continue
        if folder not in ranks:
            ranks[folder] = in_scope(os.path.dirname(_rel(root, f)))
        if ranks[folder] is not None:
            cand.append((stem, (ranks[folder], 0, f.count(os.sep), f), f))
    for z in zips:
        try:
            with zipfile.ZipFile(z) as zf:  # central directory only: no member is read here
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        except (OSError, zipfile.BadZipFile) as e:
            problems.add(_rel(root, z), f"is not a readable zip file ({e})")
            continue
        for m in names:
            base = m.rsplit("/", 1)[-1]
            stem, ext = os.path.splitext(base)
            if ext.lower() in IMAGE_EXTS and not base.startswith("._") and not m.startswith("__MACOSX/"):
                cand.append((stem, (0, 1, m.count("/"), z + "!" + m), f"{ZIP_PREFIX}{z}!{m}"))
    cand.sort(key=lambda t: (t[0], t[1]))
    index: dict[str, str] = {}
    for stem, _, ref in cand:
        index.setdefault(stem, ref)
    return index


def _dir_rank(pattern: re.Pattern[str], strict: bool):
    """Rank of a folder: 0 when a path component matches pattern, else 1 (or None: out of scope)."""
    def rank(reldir: str) -> int | None:
        if any(pattern.fullmatch(p.lower()) for p in reldir.split(os.sep)):
            return 0
        return None if strict else 1
    return rank


# ------------------------------------------------------------------------------------------ detection
@dataclass
class _Plan:
    layout: Layout
    metadata: list[str]
    frames: list[tuple[pd.DataFrame, dict[str, str], str]] = field(default_factory=list)  # (rows, index, where)


def _detect(root: Path, files: list[str], problems: Problems, skipped: list[str]) -> _Plan:
    ham = _shallowest(root, files, _HAM_META)
    isic = _shallowest(root, files, (_ISIC_GT.format("training"),))
    depth = min(_depth(root, f[0]) for f in (ham, isic) if f) if ham or isic else None
    # A CSV of our own in the folder itself beats a download found further down (e.g. an old copy).
    own = _own_candidates(root, files) if depth != 0 else []
    if len(own) > 1:
        raise SourceError([f"several CSV files with an image_id column: {', '.join(_rel(root, f) for f in own)}; "
                           "keep one (or name it metadata.csv)"], root)
    if own:
        return _plan_own(root, files, own[0], problems)
    if ham and (not isic or _depth(root, ham[0]) <= _depth(root, isic[0])):
        return _plan_ham(root, files, ham, problems)
    if isic:
        return _plan_isic(root, files, isic[0], problems, skipped)
    looked = ("HAM10000_metadata.csv / HAM10000_metadata.tab / HAM10000_metadata (Kaggle, Harvard Dataverse), "
              "ISIC2018_Task3_Training_GroundTruth.csv (ISIC 2018 Task 3), or one CSV in the folder itself "
              "with an image_id column (own layout)")
    raise SourceError([f"no HAM10000 source found; looked for {looked}"], root)


def _own_candidates(root: Path, files: list[str]) -> list[str]:
    found = []
    for f in files:
        name = os.path.basename(f).lower()
        if os.path.dirname(f) != str(root) or not name.endswith(_OWN_EXTS) or name.startswith("hmnist_"):
            continue
        with open(f, "rb") as fh:
            head = fh.readline(65536).decode("utf-8", "replace").lower()
        if re.search(r"(^|[,;\t\"\s])image_id([,;\t\"\s]|$)", head):
            found.append(f)
    named = [f for f in found if os.path.basename(f).lower() == "metadata.csv"]
    return named or found


def _plan_ham(root: Path, files: list[str], ham: list[str], problems: Problems) -> _Plan:
    meta = ham[0]
    if len(ham) > 1:  # e.g. HAM10000_metadata and HAM10000_metadata.tab side by side
        first = Path(meta).read_bytes()
        differ = [f for f in ham[1:] if Path(f).read_bytes() != first]
        if differ:
            problems.add(_rel(root, meta), "differs from " + ", ".join(_rel(root, f) for f in differ)
                         + "; keep one metadata file")
    zips = [f for f in files if _HAM_IMAGE_DIR.fullmatch(os.path.basename(f).lower().removesuffix(".zip"))
            and f.lower().endswith(".zip")]
    layout = Layout.KAGGLE if os.path.basename(meta).lower().endswith(".csv") and not zips else Layout.DATAVERSE
    plan = _Plan(layout, [meta])
    table = read_table(Path(meta), _rel(root, meta), problems)
    if table is not None:
        index = _image_index(root, files, _dir_rank(_HAM_IMAGE_DIR, strict=False), zips, problems)
        plan.frames.append((ham_frame(table, problems), index,
                            "HAM10000_images_part_1/ and _part_2/ (folders or .zip)"))
    return plan


def _plan_isic(root: Path, files: list[str], gt_train: str, problems: Problems, skipped: list[str]) -> _Plan:
    plan = _Plan(Layout.ISIC2018, [])
    for word, split in _ISIC_SPLITS:
        gt = [gt_train] if split is None else _shallowest(root, files, (_ISIC_GT.format(word),))
        if not gt:
            continue
        groups = _shallowest(root, files, (_ISIC_GROUPS.format(word),))
        if split is None and not groups:
            problems.add(_rel(root, gt[0]), "needs ISIC2018_Task3_Training_LesionGroupings.csv beside it (lesion ids "
                                            "keep one lesion's images in one split); download it from the "
                                            "ISIC 2018 challenge data page")
        plan.metadata += gt[:1] + groups[:1]
        gt_table = read_table(Path(gt[0]), _rel(root, gt[0]), problems)
        g_table = read_table(Path(groups[0]), _rel(root, groups[0]), problems) if groups else None
        if gt_table is None:
            continue
        inputs = tuple(p.format(word) for p in _ISIC_INPUT)
        pattern = re.compile("|".join(map(re.escape, inputs)))
        zips = [f for f in files if os.path.basename(f).lower() in tuple(i + ".zip" for i in inputs)]
        index = _image_index(root, files, _dir_rank(pattern, strict=True), zips, problems)
        frame = isic_frame(gt_table, g_table, split, problems, skipped)
        plan.frames.append((frame, index, f"ISIC2018_Task3_{word.capitalize()}_Input/ (folder or .zip)"))
    return plan


def _plan_own(root: Path, files: list[str], meta: str, problems: Problems) -> _Plan:
    plan = _Plan(Layout.OWN, [meta])
    table = read_table(Path(meta), _rel(root, meta), problems)
    if table is not None:
        index = _image_index(root, files, lambda reldir: 0, [], problems)
        plan.frames.append((ham_frame(table, problems, own=True), index, "anywhere below the folder"))
    return plan


# ------------------------------------------------------------------------------------------ validation
def _where(df: pd.DataFrame, i: int) -> dict:
    return {"row": int(df["_row"].iat[i]), "line": int(df["_line"].iat[i])}


def _id_reason(s: str) -> str:
    if s == "":
        return "is empty"
    if "/" in s or "\\" in s:
        return "contains a path separator"
    if ".." in s:
        return "contains '..'"
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        return "contains a control character"
    if any(c.isspace() for c in s):
        return "contains a space"
    stem, ext = os.path.splitext(s)
    if ext.lower() in IMAGE_EXTS and _PLAIN_ID.fullmatch(stem):
        return f"contains a dot (give the id without the file extension: {stem!r})"
    if "." in s:
        return "contains a dot"
    return "contains characters other than letters, digits, '_' and '-'"


def _check_rows(df: pd.DataFrame, problems: Problems) -> np.ndarray:
    """Report bad ids, dx, lesion ids, ages and duplicates; returns the mask of rows with a safe id."""
    ids = df["image_id"].fillna("").astype(str)
    safe = ids.str.fullmatch(_PLAIN_ID).to_numpy(dtype=bool)
    for i in np.flatnonzero(~safe):
        problems.add(df["_file"].iat[i], f"image_id {ids.iat[i]!r} is not a plain name: it {_id_reason(ids.iat[i])} "
                     "(allowed: letters, digits, '_' and '-')", **_where(df, i))
    dx = df["dx"].fillna("").astype(str).str.lower()
    for i in np.flatnonzero(~dx.isin(CLASSES).to_numpy()):
        problems.add(df["_file"].iat[i], f"unknown dx {df['dx'].iat[i]!r} (expected one of {', '.join(CLASSES)})",
                     **_where(df, i))
    df["dx"] = dx.to_numpy()
    for i in np.flatnonzero(df["lesion_id"].fillna("").astype(str).eq("").to_numpy()):
        problems.add(df["_file"].iat[i], "lesion_id is empty", **_where(df, i))
    age_text = df["age"].fillna("").astype(str)
    absent = age_text.str.lower().isin(_NA_TOKENS)  # R / Dataverse exports write NA for a missing age
    age = pd.to_numeric(age_text.where(~absent, None), errors="coerce")
    bad_age = ~absent.to_numpy() & ~age.between(0, 130).to_numpy()
    for i in np.flatnonzero(bad_age):
        problems.add(df["_file"].iat[i], f"age {age_text.iat[i]!r} is not a number between 0 and 130",
                     **_where(df, i))
    df["age"] = age.where(~bad_age).astype(np.float64).to_numpy()
    dup = ids.duplicated(keep=False).to_numpy() & safe
    if dup.any():
        first: dict[str, int] = {}
        for i in np.flatnonzero(dup):
            key = ids.iat[i]
            if key not in first:
                first[key] = i
                continue
            j = first[key]
            problems.add(df["_file"].iat[i], f"duplicate image_id {key!r} (first at {df['_file'].iat[j]} row "
                         f"{df['_row'].iat[j]})", **_where(df, i))
    return safe


def _resolve_images(df: pd.DataFrame, index: dict[str, str], meta_dir: str, safe: np.ndarray) -> pd.Series:
    """The image reference of each row (NaN when not found)."""
    ids = df["image_id"]
    refs = ids.map(index)
    lower = {k.lower(): v for k, v in index.items()}  # a lower-cased copy of a folder renames files too
    refs = refs.fillna(ids.str.lower().map(lower))
    hint = df[HINT]
    if hint.notna().any():  # own layout with an `image` column: paths relative to the CSV
        paths = hint.dropna().map(lambda p: os.path.normpath(os.path.join(meta_dir, p)))
        refs.loc[paths.index] = paths.where(paths.map(os.path.isfile))
    return refs.where(safe)


def load_source(root: str | Path, allow_missing: bool = False) -> SourceTable:
    """Read and validate the HAM10000 download in `root`; raise SourceError listing every problem.

    allow_missing=True leaves out rows whose image file is missing (listed in `.missing`, for the
    caller to report) instead of failing on them."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise SourceError([f"{root} is a file: pass the folder that holds the metadata file and the images"
                           if root.exists() else f"{root} does not exist"])
    files = _walk(root)
    problems, skipped = Problems(), []
    plan = _detect(root, files, problems, skipped)
    frames = [frame.assign(_part=k) for k, (frame, _, _) in enumerate(plan.frames)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*COLUMNS, HINT, "_part"])
    safe = _check_rows(df, problems)  # across files too: ISIC training/validation/test ids must not repeat
    df["image"] = None
    missing: list[str] = []
    meta_dir = os.path.dirname(plan.metadata[0])
    for k, (_, index, looked) in enumerate(plan.frames):
        sel = np.flatnonzero(df["_part"].to_numpy() == k)
        part = df.iloc[sel]
        refs = _resolve_images(part, index, meta_dir, safe[sel]).to_numpy()
        df.iloc[sel, df.columns.get_loc("image")] = refs
        lost = np.flatnonzero(safe[sel] & pd.isna(refs))
        if len(lost) and len(lost) == len(part):
            problems.add(part["_file"].iat[0], f"no image found for any of its {len(part)} rows; looked for "
                         f"<image_id>.jpg/.jpeg/.png in {looked}")
            continue
        for i in lost:
            hint = part[HINT].iat[i]
            what = f"image file {hint!r}" if isinstance(hint, str) else f"image {part['image_id'].iat[i]}.jpg"
            problems.add(part["_file"].iat[i], f"{what} not found in {looked}", missing_image=True,
                         **_where(part, i))
        missing += part["image_id"].iloc[lost].tolist()
    if problems.items or (problems.missing and not allow_missing):
        hint = "Fix these and run again." + (" To go on without the missing images, pass --allow-missing."
                                             if problems.missing else "")
        raise SourceError(problems.messages(include_missing=not allow_missing), root, hint)
    df = df[df["image"].notna()]
    df = df[list(COLUMNS)].sort_values("image_id", kind="stable").reset_index(drop=True)
    meta = [Path(f) for f in plan.metadata]
    digest = hashlib.sha256()
    for f in meta:  # one file: equals `sha256sum FILE`; several: their bytes in this fixed order
        digest.update(f.read_bytes())
    return SourceTable(root, plan.layout, df, meta, digest.hexdigest(), sorted(missing), sorted(skipped))


# ------------------------------------------------------------------------------------------ image bytes
def read_image_bytes(ref: str) -> bytes:
    """The bytes of an image reference from SourceTable.df["image"]: a file path or zip://ZIP!MEMBER."""
    if ref.startswith(ZIP_PREFIX):
        body = ref[len(ZIP_PREFIX):]
        cut = body.lower().find(".zip!")
        if cut < 0:
            raise ValueError(f"bad zip image reference {ref!r} (expected zip://<zip path>!<member>)")
        return _open_zip(body[:cut + 4], os.getpid()).read(body[cut + 5:])
    with open(ref, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=8)
def _open_zip(path: str, pid: int) -> zipfile.ZipFile:
    # Parsing a 5,000-member central directory per image would dominate packing: keep a few zips open.
    # Keyed by pid: a handle inherited through fork shares its file offset with the parent.
    return zipfile.ZipFile(path)
