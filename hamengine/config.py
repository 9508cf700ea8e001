"""Every configuration of hamengine as dataclasses, plus the class list.

A config is resolved once (file, then flags) into one of these dataclasses and saved with its
run. `from_dict` rejects unknown keys, so a typo in a config file is an error, never ignored.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from hamengine.errors import ConfigError
from hamengine.recipes import RECIPES, recipe_help

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
# The one pixel limit (width x height) for every image hamengine opens: pack, predict, explain and
# serve (loaders/imaging.open_image). 64 M pixels (8000 x 8000) is far above any dermatoscope or phone
# camera, and bounds a decoded RGB image at ~192 MB of memory. It is below PIL's own warning threshold
# (~89 M), so our check, made from the header before any pixel is decoded, is the one that fires.
MAX_PIXELS = 64_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    AUTO = "auto"  # TrainConfig.amp_dtype only: measured on a CPU, bf16 (fp16 without it) on CUDA
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class MemoryFormat(StrEnum):
    AUTO = "auto"  # a loader used alone: channels_last on CUDA, NCHW on CPU (the engine passes its measured choice)
    CHANNELS_LAST = "channels_last"
    CONTIGUOUS = "contiguous"


class Balance(StrEnum):
    NONE = "none"
    SAMPLER = "sampler"  # class-balanced sampling of the train split
    LOSS = "loss"  # inverse-frequency class weights in the loss
    EFFECTIVE = "effective"  # effective-number class weights (Cui et al., CVPR 2019; beta 0.999)
    LOGIT_ADJUST = "logit-adjust"  # logit-adjusted loss (Menon et al., ICLR 2021; tau 1): CE(z + log prior)


class Optimizer(StrEnum):
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(StrEnum):
    COSINE = "cosine"
    CONSTANT = "constant"
    # Linear warm-up over max(warmup_epochs, onecycle_peak (0.2) x epochs), then linear decay to 0 at the last
    # step (a one-cycle / airbench-style triangle; engine/optim.lr_factor).
    ONECYCLE = "onecycle"


class TTA(StrEnum):
    """Test-time augmentation: the views whose probabilities are averaged (engine/predict.tta_views)."""

    NONE = "none"
    FLIPS = "flips"  # identity, horizontal, vertical, both (4 views)
    FLIPS_ROT = "flips+rot"  # the 8 symmetries of the square: 90-degree rotations x horizontal flip


class Decision(StrEnum):
    """How a run turns probabilities into a predicted class (saved in RUN/calibration.json and
    applied by eval, predict, serve and the ISIC CSV alike)."""

    ARGMAX = "argmax"  # the most probable class
    VAL_BIAS = "val-bias"  # per-class biases on log-probabilities, fitted on val for balanced accuracy


class CheckpointName(StrEnum):
    """The weights of a run: checkpoints/<name>.pt."""

    BEST = "best"  # written when the val balanced accuracy improves (val picks the epoch)
    LAST = "last"  # written after every epoch: the final weights once training ends (EMA when on)


class CompileMode(StrEnum):
    AUTO = "auto"  # on with CUDA; on CPU when the run can pay the compile back (engine/runtime/execution.py)
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
    # The consumer lets the loader rewrite a train batch's memory once it has read RING_SPARE - 1
    # (resident.py) more batches, as FFCV and DALI do: the resident loader's CPU workers then write
    # into a ring of shared buffers instead of fresh shared memory per batch. Off: every batch is
    # its own memory (safe to keep, e.g. list(loader)). The trainer and bench loader turn it on.
    recycle_batches: bool = False
    meta: bool = False  # also yield the metadata vectors [N, M] (loaders/ingest/metadata.py) with each batch
    meta_schema: Any = None  # loaders.metadata.MetaSchema to encode with (a run's); None: the pack's own


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
    max_pixels: int = MAX_PIXELS  # decompression-bomb guard (loaders/imaging.open_image)


class OnResume(StrEnum):
    """What `train --resume` lets an option change (the saved config.json is the run's recipe)."""

    FIXED = "fixed"  # part of what the run computes: a change is refused
    EXTEND = "extend"  # may only grow (epochs: extending a run)
    FREE = "free"  # how or where the run executes (device, workers, loader, compile, memory format)
    SAME_PACK = "same-pack"  # the pack may have moved, but must be the same pack (fingerprint)


def option(default: Any = None, help: str = "", *, flag: str | None = None, default_help: str | None = None,
           choices: tuple[str, ...] | None = None, path: bool = False, resume: OnResume = OnResume.FIXED,
           sub: str | None = None, factory: Any = None) -> Any:
    """A config field that is also a command-line option: the command line is generated from these
    (hamengine/commands/train.py), so a new option is one line here.

    help: the option's help text; default_help: what [default: ...] says when the default is None
    or a rule; flag: the option's declaration when not `--<name>` (e.g. "--amp/--no-amp");
    choices: a subset of the enum's values to offer; path: a file/folder argument; resume: see
    OnResume; sub: the option sets this key of a nested config (`--aug` -> aug.preset)."""
    meta = {"help": help, "flag": flag, "default_help": default_help, "choices": choices, "path": path,
            "resume": resume, "sub": sub}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# The kinds that read a pack (train, eval, bench train): every kind but `folder`, which reads the
# original download image by image (the baseline of `hamengine bench loader --source`).
PACK_LOADERS: tuple[str, ...] = tuple(k.value for k in LoaderKind if k != LoaderKind.FOLDER)


@dataclass
class TrainConfig:
    recipe: str = option("default", "Named set of options applied under --config and the flags "
                         f"({recipe_help()}).", choices=tuple(RECIPES))
    pack: str = option("", "Pack folder (hamengine pack) to train on.", path=True, resume=OnResume.SAME_PACK,
                       default_help="required, here or in --config")
    model: str = option("resnet50", "Model name (see `hamengine models`).")
    pretrained: bool = option(False, "Start from torchvision ImageNet weights (TORCH_HOME cache).",
                              flag="--pretrained/--no-pretrained")
    pretrained_path: str | None = option(None, "Start from a local weights file (state dict or hamengine "
                                         "checkpoint).", path=True, default_help="none")
    epochs: int = option(30, "Number of epochs (on --resume: only raised, to extend the run).",
                         resume=OnResume.EXTEND)
    batch_size: int = option(32, "Batch size per process (32: enough optimizer steps on HAM10000's ~7,000 train "
                             "images; see BENCHMARKS.md).")
    size: int = option(224, "Input side S in pixels (S x S crops).")
    lr: float | None = option(None, "Peak learning rate.", default_help="2e-3 x sqrt(batch/128) for AdamW, "
                              "0.1 x batch/256 for SGD; a quarter of that with pretrained weights")
    weight_decay: float | None = option(None, "Weight decay (not on norms/biases).",
                                        default_help="0.05 with adamw, 1e-4 with sgd")
    optimizer: Optimizer = option(Optimizer.ADAMW, "Optimizer.")
    schedule: Schedule = option(Schedule.COSINE, "LR schedule after the linear warm-up (onecycle: warm-up "
                                "over max(--warmup-epochs, --onecycle-peak of the epochs), then linear to 0).")
    warmup_epochs: float = option(1.0, "Linear LR warm-up epochs.")
    onecycle_peak: float = option(0.2, "With --schedule onecycle: the share of the epochs over which the LR rises to "
                                  "its peak (at least --warmup-epochs); FFCV's ResNet recipes peak at epoch 2.")
    label_smoothing: float = option(0.1, "Label smoothing.")
    balance: Balance = option(Balance.SAMPLER, "Class imbalance: none; sampler (class-balanced sampling); loss "
                              "(inverse-frequency weights); effective (effective-number weights, beta 0.999); "
                              "logit-adjust (logit-adjusted loss, tau 1: any loader).")
    amp: bool = option(True, "Mixed precision where it helps: with --amp-dtype auto, bf16 only where it measures "
                       "faster than fp32 on this host (a CPU without native bf16 runs fp32, and the train header "
                       "says why); --no-amp forces fp32.", flag="--amp/--no-amp")
    amp_dtype: Precision = option(Precision.AUTO, "Autocast dtype: auto (CPU: a few timed steps of this model, side "
                                  "and batch in fp32 and bf16, cached per host; bf16 kept only when >= 1.1x faster. "
                                  "CUDA: bf16, or fp16 with a GradScaler on GPUs without bf16); bf16 or fp16 force "
                                  "it; fp32 = no autocast.")
    channels_last: bool | None = option(None, "Memory format: --channels-last / --no-channels-last force it.",
                                        flag="--channels-last/--no-channels-last", resume=OnResume.FREE,
                                        default_help="auto: channels_last on CUDA; on CPU the faster of NCHW and "
                                        "channels_last in the same timed steps")
    compile: CompileMode = option(CompileMode.AUTO, "torch.compile: auto = on with CUDA; on CPU only when the run is "
                                  "long enough to pay back inductor's ~90 s of compiling (steps 10-40% shorter "
                                  "measured); failure falls back to "
                                  "eager.", resume=OnResume.FREE)
    decision: Decision = option(Decision.ARGMAX, "Decision rule after training: argmax, or val-bias (per-class "
                                "biases fitted on the val split to maximize val balanced accuracy, stored in the "
                                "run and applied by eval, predict, serve and the ISIC CSV).")
    test_tta: TTA = option(TTA.NONE, "Test-time augmentation of the test evaluation that ends training; eval, "
                           "predict, explain and serve use it too unless given --tta.")
    checkpoint: CheckpointName = option(CheckpointName.BEST, "The weights the run is judged by: best (highest "
                                        "val balanced accuracy; val picks the epoch) or last (the final "
                                        "weights, EMA when on: what a one-cycle schedule ends on). The test "
                                        "evaluation that ends training scores them; eval, predict, explain "
                                        "and serve load them unless given --checkpoint.")
    ema: float | None = option(None, "EMA decay of the weights (e.g. 0.999).", default_help="off")
    grad_clip: float | None = option(None, "Clip the gradient norm to this value.", default_help="off")
    loader: LoaderKind = option(LoaderKind.AUTO, "Data loader kind (folder, the per-file baseline, is for "
                                "`hamengine bench loader`).", choices=PACK_LOADERS,
                                resume=OnResume.FREE)
    aug: AugConfig = option(help="Train augmentation preset.", factory=AugConfig, sub="preset")
    workers: int = option(0, "Loader workers/threads (0 = all cores).", resume=OnResume.FREE)
    seed: int = option(0, "Random seed.")
    out: str = option("runs/run", "Run directory.", path=True, resume=OnResume.FREE)
    resume: bool = option(False, "Continue the run in --out from checkpoints/last.pt (its config.json is the "
                          "base; only --epochs (raised), --early-stop and how it runs (--device, --workers, "
                          "--loader, --compile, memory format, a moved --pack) may change).", flag="--resume",
                          resume=OnResume.FREE)
    early_stop: int = option(0, "Stop after N epochs without a val balanced-accuracy gain (0 = off).",
                             resume=OnResume.FREE)
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", resume=OnResume.FREE)
    max_steps_per_epoch: int = option(0, "Cap the steps of each epoch (smoke tests; 0 = whole epoch).")
    progressive_min_size: int = option(0, "Progressive resizing: train batches start at this side and grow "
                                       "linearly to --size, in steps of 32 px (0 = off; val/test at --size).")
    progressive_end: float = option(0.75, "Fraction of the epochs by which progressive resizing reaches --size.")
    meta: bool = option(False, "Fuse patient/lesion metadata (age, sex, body site; never dx_type) with the image "
                        "features: a small MLP over the pack's metadata encoding, joined before the head.",
                        flag="--meta/--no-meta")
    meta_dropout: float = option(0.3, "With --meta: probability that a whole field (age, sex or site) of a train "
                                 "sample is blanked to 'unknown', so predictions without metadata degrade "
                                 "gracefully.")
    budget: str | None = option(None, "Wall-clock budget for the whole run (setup, training, validation and "
                                "the test evaluation), e.g. 20m, 90s, 1h: --epochs is planned from measured "
                                "step times to fit it.", default_help="none")
    budget_sides: str | None = option(None, "With --budget: comma-separated sides the run may train at (e.g. "
                                      "112,128,160); it takes the largest whose measured step time affords "
                                      "--budget-min-epochs epochs in the budget, else the smallest, and records "
                                      "the choice in budget.json. A recipe's sides step aside for --size given by a flag or --config "
                                      "file; --budget-sides given so wins over --size.",
                                      default_help="off: train at --size")
    budget_min_epochs: int = option(40, "With --budget-sides: the epochs a side must afford to be chosen.")

    def budget_side_list(self) -> list[int]:
        """--budget-sides as integers (ValueError on a malformed list; check() names it)."""
        return [int(v) for v in (self.budget_sides or "").split(",") if v.strip()]

    def check(self) -> None:
        """Range checks a type cannot express; ConfigError names the option and its allowed range."""
        rules = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("size", self.size >= 8, ">= 8 pixels"),
                 ("lr", self.lr is None or self.lr > 0, "> 0"),
                 ("weight_decay", self.weight_decay is None or self.weight_decay >= 0, ">= 0"),
                 ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
                 ("onecycle_peak", 0 <= self.onecycle_peak < 1, "in [0, 1), e.g. 0.2"),
                 ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                 ("ema", self.ema is None or 0 < self.ema < 1, "in (0, 1), e.g. 0.999"),
                 ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0"),
                 ("workers", self.workers >= 0, ">= 0 (0 = all cores)"),
                 ("early_stop", self.early_stop >= 0, ">= 0 (0 = off)"),
                 ("max_steps_per_epoch", self.max_steps_per_epoch >= 0, ">= 0 (0 = whole epoch)"),
                 ("progressive_min_size", self.progressive_min_size == 0 or 32 <= self.progressive_min_size
                  <= self.size, f"0 (off) or in [32, --size {self.size}]"),
                 ("progressive_end", 0 < self.progressive_end <= 1, "in (0, 1]"),
                 ("meta_dropout", 0 <= self.meta_dropout < 1, "in [0, 1)")]
        bad = [f"--{name.replace('_', '-')} {getattr(self, name)!r} must be {allowed}"
               for name, ok, allowed in rules if not ok]
        if LoaderKind(self.loader).value not in PACK_LOADERS:
            bad.append(f"--loader {self.loader}: training reads the pack, so use one of {', '.join(PACK_LOADERS)} "
                       f"(folder, the per-file baseline over the original download, is for `hamengine bench "
                       f"loader --source`)")
        if self.recipe not in RECIPES:
            bad.append(f"--recipe {self.recipe!r} is not a known recipe; known: {', '.join(RECIPES)}")
        if self.budget is not None:
            try:
                parse_duration(self.budget)
            except ConfigError as e:
                bad.append(str(e))
        if self.budget_sides is not None:
            try:
                if not self.budget_side_list() or min(self.budget_side_list()) < 32:
                    raise ValueError
            except ValueError:
                bad.append(f"--budget-sides {self.budget_sides!r} must be comma-separated sides of at least 32 "
                           "pixels, e.g. 112,128,160")
        if self.budget_min_epochs < 1:
            bad.append(f"--budget-min-epochs {self.budget_min_epochs} must be >= 1")
        if bad:
            raise ConfigError("; ".join(bad))


@dataclass(frozen=True)
class ResumeConflict:
    """One setting a resumed run may not take: `key` as the option names it (aug.hue for nested)."""

    key: str
    saved: Any
    asked: Any
    rule: OnResume

    def __str__(self) -> str:
        flag = self.key if "." in self.key else "--" + self.key.replace("_", "-")
        return f"{flag} {self.saved} (asked: {self.asked})"


def resume_conflicts(saved: TrainConfig, asked: TrainConfig) -> list[ResumeConflict]:
    """The settings of `asked` that `train --resume` must refuse against the run's saved config
    (OnResume on each field). A moved pack (SAME_PACK) is left to the caller, which can open it."""
    old, new = to_dict(saved), to_dict(asked)
    out = []
    for f in dataclasses.fields(TrainConfig):
        rule = f.metadata.get("resume", OnResume.FIXED)
        a, b = old[f.name], new[f.name]
        if a == b or rule in (OnResume.FREE, OnResume.SAME_PACK) or (rule == OnResume.EXTEND and b > a):
            continue
        if isinstance(a, dict):  # nested (aug): name each key that differs
            out += [ResumeConflict(f"{f.name}.{k}", a[k], b.get(k), rule) for k in a if a[k] != b.get(k)]
        else:
            out.append(ResumeConflict(f.name, a, b, rule))
    return out


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


def parse_duration(text: str) -> float:
    """'90s' / '20m' / '1.5h' / '1h30m' / '600' (seconds) -> seconds (--budget)."""

    t = str(text).strip().lower().replace(" ", "")
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    elif t and re.fullmatch(r"(\d+(\.\d+)?[hms])+", t):
        seconds = sum(float(num) * units[unit] for num, _, unit in re.findall(r"(\d+(\.\d+)?)([hms])", t))
    else:
        raise ConfigError(f"--budget {text!r}: cannot read a duration; use e.g. 90s, 20m, 1h or 1h30m")
    if seconds <= 0:
        raise ConfigError(f"--budget {text!r} must be positive")
    return seconds


@dataclass
class DemoConfig:
    """`hamengine demo` (engine/demo.py): the options it shows are declared here, once."""

    workdir: str = option("demo-data", "Folder for the synthetic data, the pack and the run (reused when run again).",
                          path=True)
    n: int = option(2000, "Synthetic images to generate.")
    seed: int = option(0, "Seed for data and training.")
    image_size: tuple[int, int] = (200, 150)  # synthetic source images (W, H)
    pack_size: int = 144  # shorter side stored in the pack
    size: int = 128  # training crop
    epochs: int = option(15, "Training epochs (the demo's tuned value for 2 CPU cores).")
    batch_size: int = 32
    lr: float = 2e-3
    balance: Balance = Balance.SAMPLER
    model: str = "hamnet"
    loader: LoaderKind = LoaderKind.AUTO
    device: str = "cpu"
