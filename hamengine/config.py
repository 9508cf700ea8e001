"""Every configuration of hamengine as dataclasses, plus the class list.

A config is resolved once (file, then flags) into one of these dataclasses and saved with its
run. `from_dict` rejects unknown keys, so a typo in a config file is an error, never ignored.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hamengine.errors import UserError

# Class order is the label index order everywhere (packs, models, metrics).
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}
# ISIC 2018 Task 3 column order (not alphabetical).
ISIC_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UserError, ValueError):
    """A configuration the user gave cannot be used; the message says which key and why."""

    exit_code = 2


class StrEnum(str, enum.Enum):
    def __str__(self) -> str:  # click / json print the value, not "Kind.X"
        return self.value


class LoaderKind(StrEnum):
    AUTO = "auto"
    DALI = "dali"
    RESIDENT = "resident"
    TORCH = "torch"
    FOLDER = "folder"
    FFCV = "ffcv"


class AugPreset(StrEnum):
    FULL = "full"  # random resized crop + any-angle rotation + flips + colour jitter
    CROP_FLIP = "crop-flip"  # random resized crop + flips only (the FFCV-comparable preset)
    NONE = "none"  # eval transform for training too (debugging)


class Precision(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class MemoryFormat(StrEnum):
    AUTO = "auto"  # channels_last on CUDA, contiguous (NCHW) on CPU: measured faster with bf16 there
    CHANNELS_LAST = "channels_last"
    CONTIGUOUS = "contiguous"


class Balance(StrEnum):
    NONE = "none"
    SAMPLER = "sampler"  # class-balanced sampling of the train split
    LOSS = "loss"  # inverse-frequency class weights in the loss


class Optimizer(StrEnum):
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(StrEnum):
    COSINE = "cosine"
    CONSTANT = "constant"


class CompileMode(StrEnum):
    AUTO = "auto"  # on with CUDA, off on CPU
    ON = "on"
    OFF = "off"


@dataclass
class AugConfig:
    """Train augmentation; the same meaning in every loader. Eval: resize shorter side + center crop."""

    preset: AugPreset = AugPreset.FULL
    scale: tuple[float, float] = (0.35, 1.0)  # random resized crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop aspect ratio
    rotation: bool = True  # uniform angle in [0, 360)
    hflip: bool = True
    vflip: bool = True
    brightness: float = 0.2  # factor uniform in [1-b, 1+b]
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02  # fraction of a full turn, uniform in [-h, h]

    def effective(self) -> AugConfig:
        """The config with the preset applied (crop-flip turns rotation and jitter off)."""
        if self.preset == AugPreset.CROP_FLIP:
            return dataclasses.replace(self, rotation=False, brightness=0.0, contrast=0.0,
                                       saturation=0.0, hue=0.0)
        return self

    @property
    def has_jitter(self) -> bool:
        return any(v > 0 for v in (self.brightness, self.contrast, self.saturation, self.hue))


@dataclass
class LoaderConfig:
    kind: LoaderKind = LoaderKind.AUTO
    size: int = 224  # output side S
    batch_size: int = 128
    aug: AugConfig = field(default_factory=AugConfig)
    dtype: Precision = Precision.BF16
    memory_format: MemoryFormat = MemoryFormat.AUTO
    workers: int = 0  # 0 = all cores
    seed: int = 0
    memory_budget_gb: float = 0.0  # resident cache budget for `auto`; 0 = half the free memory
    cache_dir: str | None = None  # resident cache location; default: PACK/cache/
    source: str | None = None  # original HAM10000 folder, for the `folder` baseline only
    balance_sampler: bool = False  # class-balanced sampling (train split only)


@dataclass
class PackConfig:
    source: str = ""
    out: str = ""
    size: int = 256  # shorter side after resize (never upscaled)
    quality: int = 90
    keep_original: bool = False
    val: float = 0.15
    test: float = 0.15
    split_file: str | None = None
    seed: int = 0
    shard_size: int = 64 * 1024 * 1024  # bytes
    workers: int = 0  # 0 = all cores
    skip_bad: bool = False
    allow_missing: bool = False
    force: bool = False
    max_pixels: int = 64_000_000  # decompression-bomb guard


@dataclass
class TrainConfig:
    pack: str = ""
    model: str = "resnet50"
    pretrained: bool = False
    pretrained_path: str | None = None
    epochs: int = 30
    batch_size: int = 128
    size: int = 224
    lr: float | None = None  # None: per optimizer default scaled by batch size
    weight_decay: float | None = None  # None: 0.05 for AdamW, 1e-4 for SGD
    optimizer: Optimizer = Optimizer.ADAMW
    schedule: Schedule = Schedule.COSINE
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    balance: Balance = Balance.NONE
    amp: bool = True
    amp_dtype: Precision = Precision.BF16
    channels_last: bool | None = None  # None: on with CUDA, off on CPU
    compile: CompileMode = CompileMode.AUTO
    ema: float | None = None  # EMA decay, e.g. 0.999
    grad_clip: float | None = None
    loader: LoaderKind = LoaderKind.AUTO
    aug: AugConfig = field(default_factory=AugConfig)
    workers: int = 0
    seed: int = 0
    out: str = "runs/run"
    resume: bool = False
    early_stop: int = 0  # epochs without val balanced-accuracy gain; 0 = off
    device: str = "auto"
    max_steps_per_epoch: int = 0  # 0 = whole epoch (tests and smoke runs cap it)

    def check(self) -> None:
        """Range checks a type cannot express; ConfigError names the option and its allowed range."""
        rules = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("size", self.size >= 8, ">= 8 pixels"),
                 ("lr", self.lr is None or self.lr > 0, "> 0"),
                 ("weight_decay", self.weight_decay is None or self.weight_decay >= 0, ">= 0"),
                 ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
                 ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                 ("ema", self.ema is None or 0 < self.ema < 1, "in (0, 1), e.g. 0.999"),
                 ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0"),
                 ("workers", self.workers >= 0, ">= 0 (0 = all cores)"),
                 ("early_stop", self.early_stop >= 0, ">= 0 (0 = off)"),
                 ("max_steps_per_epoch", self.max_steps_per_epoch >= 0, ">= 0 (0 = whole epoch)")]
        bad = [f"--{name.replace('_', '-')} {getattr(self, name)!r} must be {allowed}"
               for name, ok, allowed in rules if not ok]
        if bad:
            raise ConfigError("; ".join(bad))


T = TypeVar("T")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed")
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(m.value for m in tp)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON-able dict (enums as values, tuples as lists): safe for weights_only checkpoints."""
    def conv(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(obj)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (or TOML) config file into a dict; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys to values")
    return data


def parse_size(text: str) -> int:
    """'64MB' / '512KB' / '1GB' / '1000' -> bytes."""
    t = text.strip().upper().replace(" ", "")
    units = {"GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "B": 1}
    unit = next((u for u in units if t.endswith(u)), None)
    num, mult = (t[: -len(unit)], units[unit]) if unit else (t, 1)
    try:
        val = float(num)
    except ValueError:
        raise ConfigError(f"cannot read size {text!r}: use e.g. 64MB, 512KB or 1GB") from None
    if val <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return int(val * mult)
