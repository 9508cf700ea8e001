"""What `hamengine pack` does to one image: decode, fix, resize, re-encode. Runs in pool workers.

Policy (the same for every image, so a pack is reproducible):
- Decode with PIL. The pixel count is checked from the header BEFORE decoding (decompression bombs).
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
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hamengine.config import StrEnum
from hamengine.errors import UserError

EXIF_ORIENTATION = 0x0112


class Conversion(StrEnum):
    NOT_JPEG = "not-jpeg"  # PNG/TIFF/BMP/... (often named .jpg)
    GRAYSCALE = "grayscale"
    CMYK = "cmyk"
    PALETTE = "palette"
    ALPHA = "alpha-dropped"
    HIGH_BIT_DEPTH = "16-bit"
    OTHER_MODE = "other-mode"  # YCbCr, LAB, HSV images
    ORIENTATION = "exif-orientation"


class BadImage(UserError):
    """An image that cannot be packed; str() is the reason recorded in the manifest."""


@dataclass(frozen=True)
class ImagePolicy:
    size: int = 256
    quality: int = 90
    keep_original: bool = False
    max_pixels: int = 64_000_000


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


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (no known image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt image header ({e})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                       f"(decompression-bomb guard)")
    if w < 1 or h < 1:
        raise BadImage(f"image has no pixels ({w}x{h})")
    try:
        im.load()
    except OSError as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg else "corrupt image data"
        raise BadImage(f"{reason} ({msg})") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt image data ({e})") from None
    return im


def _to_rgb(im: Image.Image, conv: list[Conversion]) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
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
    im = _open(data, policy.max_pixels)
    conv: list[Conversion] = []
    is_jpeg = im.format == "JPEG"
    if not is_jpeg:
        conv.append(Conversion.NOT_JPEG)
    orig_w, orig_h = im.size
    progressive = bool(im.info.get("progressive") or im.info.get("progression"))
    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is not worth rejecting the pixels for
        orientation = 1
    if orientation in range(2, 9):
        conv.append(Conversion.ORIENTATION)
        im = ImageOps.exif_transpose(im)
    rgb = _to_rgb(im, conv)
    w, h = target_size(rgb.width, rgb.height, policy.size)
    if (policy.keep_original and is_jpeg and not conv and not progressive and (w, h) == rgb.size):
        return Encoded(data, w, h, orig_w, orig_h, (), True)
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=policy.quality, subsampling=2, optimize=False, progressive=False)
    return Encoded(buf.getvalue(), w, h, orig_w, orig_h, tuple(str(c) for c in conv), False)
