"""Patient and lesion metadata as model inputs: age, sex and body site, encoded one way for every loader.

HAM10000 ships, per image, the patient's age and sex and the lesion's body site (`localization`).
The winning ISIC 2019 solutions fused such columns with the image features (Gessert et al. 2020).
The encoding, a float vector of `MetaSchema.width` values per image:

    [age_z, age_missing, sex one-hot (male, female, unknown), site one-hot (14 sites, unknown)]

age_z = (age - train mean) / train sd, and 0 with age_missing = 1 when the age is absent. Values
outside a vocabulary (ISIC's other site names, typos, blanks) fall into the `unknown` slot.

`dx_type` (histopathology, follow-up, consensus, confocal) is NEVER an input: how a diagnosis was
confirmed depends on the diagnosis (most melanomas are excised, most naevi followed up), so it would
leak the label. `encode_row` reads only the three FIELDS, whatever else a row holds.

The schema (vocabularies, age statistics from the train split only) is recorded in the pack's
manifest under `metadata`, so train, eval, predict and serve encode identically.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hamengine.errors import UserError

if TYPE_CHECKING:
    import torch

FIELDS: tuple[str, ...] = ("age", "sex", "localization")  # the only columns a model may see
NEVER: tuple[str, ...] = ("dx_type", "dx", "lesion_id", "image_id", "dataset")  # leaks or identifiers
SEXES: tuple[str, ...] = ("male", "female")
SITES: tuple[str, ...] = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
                          "lower extremity", "neck", "scalp", "trunk", "upper extremity")
UNKNOWN = "unknown"
AGE_RANGE = (0.0, 120.0)  # HAM10000 ages are 0-85 in steps of 5; outside this a value is an error
SCHEMA_VERSION = 1


class MetadataError(UserError, ValueError):
    """A metadata value that cannot be encoded; the message names the field and what is accepted."""


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value).strip().lower()
    return s or None


def parse_age(value: Any, strict: bool = False) -> float | None:
    """A float age, or None when absent. Unparseable or out-of-range: None (strict=False, data from a
    pack) or MetadataError (strict=True, a user's input to predict/serve)."""
    s = _text(value)
    if s is None or s == UNKNOWN:
        return None
    try:
        age = float(s)
    except ValueError:
        if strict:
            raise MetadataError(f"age {value!r} is not a number (give years, e.g. 45, or leave it out)") from None
        return None
    if not (AGE_RANGE[0] <= age <= AGE_RANGE[1]) or math.isnan(age):
        if strict:
            raise MetadataError(f"age {value!r} is outside {AGE_RANGE[0]:.0f}-{AGE_RANGE[1]:.0f} years")
        return None
    return age


def parse_choice(field: str, value: Any, vocab: tuple[str, ...], strict: bool = False) -> str:
    """The vocabulary entry, or UNKNOWN. strict: a value outside the vocabulary is a MetadataError."""
    s = _text(value)
    if s is None or s == UNKNOWN:
        return UNKNOWN
    if s in vocab:
        return s
    if strict:
        raise MetadataError(f"{field} {value!r} is not one of: {', '.join(vocab)}, {UNKNOWN}")
    return UNKNOWN


@dataclass(frozen=True)
class MetaSchema:
    age_mean: float
    age_std: float
    sexes: tuple[str, ...] = SEXES
    sites: tuple[str, ...] = SITES

    @property
    def width(self) -> int:
        return 2 + len(self.sexes) + 1 + len(self.sites) + 1

    def columns(self) -> list[str]:
        return (["age_z", "age_missing"] + [f"sex={s}" for s in (*self.sexes, UNKNOWN)]
                + [f"site={s}" for s in (*self.sites, UNKNOWN)])

    def slices(self) -> dict[str, slice]:
        """Where each field lives in the vector (metadata dropout blanks whole fields)."""
        s0 = 2
        s1 = s0 + len(self.sexes) + 1
        return {"age": slice(0, 2), "sex": slice(s0, s1), "localization": slice(s1, self.width)}

    def encode_row(self, row: Mapping[str, Any], strict: bool = False) -> np.ndarray:
        """float32 [width] from a row holding any of FIELDS (other keys, dx_type included, are ignored)."""
        v = np.zeros(self.width, dtype=np.float32)
        age = parse_age(row.get("age"), strict)
        if age is None:
            v[1] = 1.0
        else:
            v[0] = (age - self.age_mean) / self.age_std
        sl = self.slices()
        sex = parse_choice("sex", row.get("sex"), self.sexes, strict)
        v[sl["sex"].start + (self.sexes.index(sex) if sex != UNKNOWN else len(self.sexes))] = 1.0
        site = parse_choice("site (localization)", row.get("localization"), self.sites, strict)
        v[sl["localization"].start + (self.sites.index(site) if site != UNKNOWN else len(self.sites))] = 1.0
        return v

    def encode(self, rows: Iterable[Mapping[str, Any]], strict: bool = False) -> np.ndarray:
        """float32 [N, width]."""
        out = [self.encode_row(r, strict) for r in rows]
        return np.stack(out) if out else np.zeros((0, self.width), dtype=np.float32)

    def missing(self) -> np.ndarray:
        """The encoding of a row with no metadata at all (what a prediction without metadata uses)."""
        return self.encode_row({})

    def record(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, "fields": list(FIELDS), "never": list(NEVER),
                "age": {"mean": self.age_mean, "std": self.age_std, "fitted_on": "train"},
                "sex": list(self.sexes) + [UNKNOWN], "localization": list(self.sites) + [UNKNOWN],
                "columns": self.columns(), "width": self.width}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> MetaSchema:
        if int(rec.get("version", 0)) != SCHEMA_VERSION:
            raise MetadataError(f"metadata schema version {rec.get('version')!r} is not {SCHEMA_VERSION}: "
                                "re-pack with this hamengine")
        return cls(float(rec["age"]["mean"]), float(rec["age"]["std"]),
                   tuple(s for s in rec["sex"] if s != UNKNOWN), tuple(s for s in rec["localization"] if s != UNKNOWN))


SITE_COLUMNS = ("localization", "site")  # a user's CSV may call the body site either


def read_meta_csv(path: str | Path, images: Sequence[str | Path]) -> list[dict[str, Any] | None]:
    """Per image, its {age, sex, localization} from a CSV with an `image` column (a path, a file
    name, or an image id without extension) and any of age, sex, localization / site. An image
    the CSV does not list gets None (every field unknown). Bad values fail here, naming the row."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MetadataError(f"{path}: cannot read the metadata CSV ({e})") from None
    if not rows or "image" not in {(k or "").strip().lower() for k in rows[0]}:
        raise MetadataError(f"{path}: needs a header with an `image` column (and any of age, sex, "
                            f"localization); found {', '.join(rows[0]) if rows else 'no rows'}")
    table: dict[str, dict[str, Any]] = {}
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): v for k, v in raw.items()}
        site = next((row[c] for c in SITE_COLUMNS if row.get(c) not in (None, "")), None)
        rec = {"age": row.get("age"), "sex": row.get("sex"), "localization": site}
        try:
            parse_age(rec["age"], strict=True)
            parse_choice("sex", rec["sex"], SEXES, strict=True)
            parse_choice("localization", rec["localization"], SITES, strict=True)
        except MetadataError as e:
            raise MetadataError(f"{path}, line {line}: {e}") from None
        name = str(row.get("image") or "").strip()
        for key in {name, Path(name).name, Path(name).stem}:
            table[key] = rec
    out: list[dict[str, Any] | None] = []
    for im in images:
        p = Path(im)
        out.append(next((table[k] for k in (str(im), p.name, p.stem) if k in table), None))
    return out


def fit_schema(train_rows: Iterable[Mapping[str, Any]]) -> MetaSchema:
    """Age statistics from the train split's rows only (val/test never inform the encoding)."""
    ages = np.array([a for a in (parse_age(r.get("age")) for r in train_rows) if a is not None], dtype=np.float64)
    mean = float(ages.mean()) if len(ages) else 50.0
    std = float(ages.std()) if len(ages) > 1 and ages.std() > 0 else 1.0
    return MetaSchema(round(mean, 6), round(std, 6))


def drop_fields(meta: torch.Tensor, schema: MetaSchema, p: float, gen: torch.Generator | None = None
                ) -> torch.Tensor:
    """Metadata dropout: each whole field of each row is replaced by its 'missing' encoding with
    probability p, so a model trained with it degrades gracefully when a field is absent."""
    import torch

    if p <= 0:
        return meta
    blank = torch.as_tensor(schema.missing(), device=meta.device, dtype=meta.dtype)
    out = meta.clone()
    for sl in schema.slices().values():
        drop = torch.rand(meta.shape[0], generator=gen, device="cpu") < p
        drop = drop.to(meta.device, non_blocking=True).unsqueeze(1)
        out[:, sl] = torch.where(drop, blank[sl].expand(meta.shape[0], -1), out[:, sl])
    return out
