"""What `hamengine pack` does to one image: decode, fix, resize, re-encode. Runs in pool workers.

Policy (the same for every image, so a pack is reproducible):
- Decode with PIL (`open_image`, the one opener of user images, also used by predict and serve).
  The pixel count is checked from the header BEFORE decoding (decompression bombs): MAX_PIXELS.
- EXIF orientation is applied (the stored pixels are upright; the new JPEG carries no EXIF).
- Anything that is not 8-bit RGB is converted and the conversion counted: grayscale and 1-bit -> RGB,
  CMYK -> RGB, palette -> RGB, alpha dropped, 16-bit/32-bit integer -> 8-bit by scaling the full
  range, a PNG/TIFF/... file named .jpg -> decoded as what it really is. ICC profiles are dropped.
- Resize so the shorter side is `size` (never upscale), LANCZOS. The longer side is
  `round_half_up(long * size / short)` in integer arithmetic: 600x450 -> 341x256.
- Re-encode as baseline JPEG: quality `quality`, 4:2:0 subsampling, no optimize, not progressive
  (the GPU's hardware JPEG decoder takes baseline only; fixed settings keep bytes reproducible).
- `keep_original`: the source bytes are stored unchanged when they already are what we would
  produce apart from the re-encoding: a baseline 8-bit RGB JPEG, upright (EXIF orientation 1 or
  none) and no larger than `size` on its shorter side. Images that need a resize are re-encoded
  (otherwise the pack would not hold the size it claims): to keep 600x450 originals use --size 450.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hamengine.config import MAX_PIXELS, StrEnum
from hamengine.errors import UserError

EXIF_ORIENTATION = 0x0112
# MAX_PIXELS (hamengine.config, so options can default to it): the one pixel limit for every image
# hamengine opens; see its comment there.
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class Conversion(StrEnum):
    NOT_JPEG = "not-jpeg"  # PNG/TIFF/BMP/... (often named .jpg)
    GRAYSCALE = "grayscale"
    CMYK = "cmyk"
    PALETTE = "palette"
    ALPHA = "alpha-dropped"
    HIGH_BIT_DEPTH = "16-bit"
    OTHER_MODE = "other-mode"  # YCbCr, LAB, HSV images
    ORIENTATION = "exif-orientation"


class ImageProblem(StrEnum):
    """What is wrong with an image; `hamengine serve` answers each with its own HTTP status."""
    UNREADABLE = "unreadable"  # the file itself cannot be read (missing, permissions)
    EMPTY = "empty"
    NOT_AN_IMAGE = "not-an-image"  # no (accepted) image format
    TOO_LARGE = "too-large"  # over the pixel limit (decompression-bomb guard)
    CORRUPT = "corrupt"  # broken header, truncated or corrupt pixel data, no pixels


class BadImage(UserError):
    """An image that cannot be used. `reason` says what is wrong and what to do (the reason a pack
    manifest records); str() puts the file or upload it concerns in front when it is known."""

    def __init__(self, reason: str, problem: ImageProblem = ImageProblem.CORRUPT, name: str | None = None):
        super().__init__(f"{name}: {reason}" if name else reason)
        self.reason = reason
        self.problem = problem
        self.name = name


@dataclass(frozen=True)
class ImagePolicy:
    size: int = 256
    quality: int = 90
    keep_original: bool = False
    max_pixels: int = MAX_PIXELS


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    conversions: tuple[str, ...]
    kept_original: bool


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side `size`, never upscaled; round half up on the longer side."""
    short, long_ = min(width, height), max(width, height)
    if short <= size:
        return width, height
    new_long = (long_ * size * 2 + short) // (2 * short)
    return (new_long, size) if width >= height else (size, new_long)


def open_image(src: bytes | str | Path, *, name: str | None = None, max_pixels: int = MAX_PIXELS,
               formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open a user image (a file path or its bytes) and decode it fully, or raise BadImage.

    The one decompression-bomb guard: width x height is read from the header (PIL opens lazily) and
    refused over `max_pixels` (default MAX_PIXELS = 64,000,000) before a single pixel is decoded.
    `formats` limits which PIL parsers may even look at the bytes (None: every format PIL reads).
    The image keeps its mode and EXIF: `to_rgb` / `upright` decide what the pixels become.
    `name` is what messages call the input (default: the path; nothing for bytes).
    """
    if not isinstance(src, bytes):
        name = name if name is not None else str(src)
        try:
            src = Path(src).read_bytes()
        except OSError as e:
            raise BadImage(f"cannot read the file ({e.strerror or e}): check the path", ImageProblem.UNREADABLE,
                           name) from None
    if not src:
        raise BadImage("empty file (0 bytes): re-export or re-copy the image", ImageProblem.EMPTY, name)
    try:
        with warnings.catch_warnings():
            # PIL's warning threshold (~89 M pixels) is above our limit: our check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(src), formats=list(formats) if formats else None)  # header only
    except Image.DecompressionBombError as e:
        raise _too_many(e, max_pixels, name) from None
    except UnidentifiedImageError:
        accepted = f" this reads ({', '.join(formats)})" if formats else " (no known image format)"
        raise BadImage(f"not an image{accepted}: give a JPEG or PNG", ImageProblem.NOT_AN_IMAGE, name) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt image header ({e}); re-export the image", ImageProblem.CORRUPT, name) from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"{w}x{h} = {w * h:,} pixels {_OVER_LIMIT.format(max_pixels)}", ImageProblem.TOO_LARGE, name)
    if w < 1 or h < 1:
        raise BadImage(f"image has no pixels ({w}x{h})", ImageProblem.CORRUPT, name)
    try:
        im.load()  # the full decode: truncated data raises (LOAD_TRUNCATED_IMAGES stays off)
    except Image.DecompressionBombError as e:
        raise _too_many(e, max_pixels, name) from None
    except OSError as e:
        msg = str(e)
        what = "truncated" if "truncated" in msg else "truncated or corrupt image data"
        raise BadImage(f"{what} ({msg}); re-export the image", ImageProblem.CORRUPT, name) from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt image data ({e}); re-export the image", ImageProblem.CORRUPT, name) from None
    return im


_OVER_LIMIT = "exceeds the limit of {:,} (decompression-bomb guard); downscale the image first"


def _too_many(e: Image.DecompressionBombError, max_pixels: int, name: str | None) -> BadImage:
    """PIL's own refusal (far over our limit, ~179 M pixels), worded as ours."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    count = f"{int(found.group(1)):,} pixels" if found else "the image"
    return BadImage(f"{count} {_OVER_LIMIT.format(max_pixels)}", ImageProblem.TOO_LARGE, name)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1: upright); a broken EXIF block counts as upright."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not worth rejecting the pixels for
        return 1


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: EXIF orientation applied (when there is one to apply)."""
    if exif_orientation(im) not in range(2, 9):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError):  # broken EXIF: keep the stored orientation
        return im


def open_rgb(src: bytes | str | Path | Image.Image, **kwargs: Any) -> Image.Image:
    """A user image (path, bytes, or an image `open_image` already opened) -> upright 8-bit RGB, with
    the same pixel rule as packing, so a file predicts as its packed copy evaluates. `kwargs` go to
    `open_image`."""
    im = src if isinstance(src, Image.Image) else open_image(src, **kwargs)
    return to_rgb(upright(im))


def to_rgb(im: Image.Image, conv: list[Conversion] | None = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; each conversion made is appended to `conv` (for the pack report)."""
    conv = [] if conv is None else conv
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in HIGH_BIT_MODES:
        conv.append(Conversion.HIGH_BIT_DEPTH)
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit sources: scale the full 0..65535 range; float/32-bit: clip to 0..255 if it fits.
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("L", "1", "LA"):
        conv.append(Conversion.GRAYSCALE)
        if mode == "LA":
            conv.append(Conversion.ALPHA)
        return im.convert("L").convert("RGB")
    if mode in ("P", "PA"):
        conv.append(Conversion.PALETTE)
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            conv.append(Conversion.ALPHA)
        return rgba.convert("RGB")
    if mode in ("RGBA", "RGBa", "RGBX"):
        if mode != "RGBX":
            conv.append(Conversion.ALPHA)
        return im.convert("RGB")
    if mode == "CMYK":
        conv.append(Conversion.CMYK)
        return im.convert("RGB")
    conv.append(Conversion.OTHER_MODE)
    return im.convert("RGB")


def process(data: bytes, policy: ImagePolicy) -> Encoded:
    """Source bytes -> packed JPEG bytes. Raises BadImage with the reason."""
    im = open_image(data, max_pixels=policy.max_pixels)
    conv: list[Conversion] = []
    is_jpeg = im.format == "JPEG"
    if not is_jpeg:
        conv.append(Conversion.NOT_JPEG)
    orig_w, orig_h = im.size
    progressive = bool(im.info.get("progressive") or im.info.get("progression"))
    if exif_orientation(im) in range(2, 9):
        conv.append(Conversion.ORIENTATION)
        im = upright(im)
    rgb = to_rgb(im, conv)
    w, h = target_size(rgb.width, rgb.height, policy.size)
    if (policy.keep_original and is_jpeg and not conv and not progressive and (w, h) == rgb.size):
        return Encoded(data, w, h, orig_w, orig_h, (), True)
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=policy.quality, subsampling=2, optimize=False, progressive=False)
    return Encoded(buf.getvalue(), w, h, orig_w, orig_h, tuple(str(c) for c in conv), False)
