"""Draw one synthetic dermatoscopic image: a class-shaped lesion on skin, then per-view nuisances.

Everything is numpy-vectorised over whole arrays (no per-pixel Python); thin lines (hairs, vessels)
go through PIL's C line drawer. Images are drawn at a reduced "working" resolution and upscaled once,
which keeps 10,015 images at 600x450 within minutes on two cores.

Determinism: a lesion's shape, colours and texture come only from `lesion_rng(seed, lesion_number)`;
everything that differs between photos of one lesion (rotation, scale, position, lighting, hair, blur,
noise) only from `image_rng(seed, image_number)`. No state is shared between images, so any worker
count produces the same bytes.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

WORK_MAX_SIDE = 320  # longer side of the drawing canvas; the result is upscaled to the output size
JPEG_QUALITY = 90
# --realism real: encode as the HAM10000 originals are (quality 100, all-ones quantization tables,
# 4:4:4 chroma) with faint sensor grain, so a 600x450 file weighs about what a real one does
# (about 270 KB, measured on real originals; the light default is about 30 KB) and the per-file
# baseline pays on synthetic data what it pays on real data.
REAL_GRAIN = 0.005  # sd of per-pixel luma grain in [0, 1] units (chroma grain: half of it)
REALISMS = ("light", "real")
_KIND_LESION, _KIND_IMAGE = 1, 2

RGB = tuple[float, float, float]


def lesion_rng(seed: int, lesion_number: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _KIND_LESION, lesion_number]))


def image_rng(seed: int, image_number: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _KIND_IMAGE, image_number]))


@dataclass(frozen=True)
class ShapeStyle:
    """Per-class ranges of the lesion outline. Ranges overlap on purpose: classes must be confusable."""

    radius: tuple[float, float]  # mean radius R as a fraction of the canvas' shorter side
    irregular: tuple[float, float]  # amplitude of the outline's harmonics (0 = circle)
    harmonics: int  # highest harmonic of the outline: more = more ragged border
    edge: tuple[float, float]  # border softness in units of R (large = fades into the skin)
    jag: tuple[float, float]  # fine, noisy border perturbation in units of R
    aspect: tuple[float, float]  # ellipse axis ratio


SHAPES: dict[str, ShapeStyle] = {
    "nv": ShapeStyle((0.24, 0.42), (0.02, 0.12), 3, (0.03, 0.10), (0.00, 0.04), (1.0, 1.35)),
    "mel": ShapeStyle((0.28, 0.46), (0.08, 0.30), 8, (0.03, 0.14), (0.03, 0.12), (1.0, 1.6)),
    "bkl": ShapeStyle((0.26, 0.44), (0.04, 0.16), 5, (0.01, 0.05), (0.01, 0.06), (1.0, 1.6)),
    "bcc": ShapeStyle((0.24, 0.40), (0.05, 0.20), 5, (0.06, 0.16), (0.02, 0.08), (1.0, 1.5)),
    "akiec": ShapeStyle((0.26, 0.44), (0.08, 0.26), 6, (0.10, 0.25), (0.04, 0.12), (1.0, 1.6)),
    "df": ShapeStyle((0.22, 0.34), (0.02, 0.10), 3, (0.10, 0.22), (0.00, 0.05), (1.0, 1.3)),
    "vasc": ShapeStyle((0.22, 0.36), (0.03, 0.14), 4, (0.03, 0.09), (0.01, 0.05), (1.0, 1.4)),
}

# A lesion borrows texture and outline from a look-alike with this probability (the confusions that
# dermatologists and real classifiers make: nv/mel/bkl, bcc/akiec, df/nv, vasc/bcc).
PARTNERS: dict[str, tuple[str, ...]] = {
    "nv": ("mel", "bkl", "df"), "mel": ("nv", "bkl"), "bkl": ("mel", "nv", "akiec"),
    "bcc": ("akiec", "nv", "bkl"), "akiec": ("bcc", "bkl"), "df": ("nv", "bkl"), "vasc": ("bcc", "mel"),
}
BLEND_PROB = 0.45
BLEND_WEIGHT = (0.2, 0.7)


def work_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the drawing canvas for an output of `size` (never larger than the output)."""
    w, h = size
    f = min(1.0, WORK_MAX_SIDE / max(w, h))
    return max(8, round(w * f)), max(8, round(h * f))


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """float32 [h, w] smooth random field with about `cells` bumps across the longer side.

    The grid's shape depends only on `cells` and the aspect, never on h/w, so one lesion drawn at
    two scales shows the same pattern."""
    gh = max(2, round(cells * h / max(h, w)) + 1)
    gw = max(2, round(cells * w / max(h, w)) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC))


def _mix(rgb: np.ndarray, color: RGB, t: np.ndarray | float) -> np.ndarray:
    t = np.asarray(t, dtype=np.float32)
    if t.ndim:
        t = t[..., None]
    return rgb + (np.asarray(color, np.float32) - rgb) * t


def _lerp(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(x + (y - x) * t for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Frame:
    """The lesion's own coordinate frame: P x P pixels, lengths in units of the mean radius R."""

    rng: np.random.Generator
    p: int  # patch side in pixels
    r_px: float  # R in pixels
    u: np.ndarray  # [P, P] x in units of R
    v: np.ndarray  # [P, P] y in units of R
    s: np.ndarray  # [P, P] radial position: 0 centre, 1 on the border, >1 outside

    def noise(self, cells_per_r: float) -> np.ndarray:
        return smooth_noise(self.rng, self.p, self.p, cells_per_r * self.p / self.r_px)

    def fill(self, color: RGB) -> np.ndarray:
        return np.broadcast_to(np.asarray(color, np.float32), (self.p, self.p, 3)).copy()


def _lines(f: Frame, rgb: np.ndarray, color: RGB, count: int, width: float, length: float,
           strength: float, branch: bool) -> np.ndarray:
    """Thin wandering (optionally branching) lines inside the lesion: bcc vessels, mel streaks."""
    canvas = Image.new("L", (f.p, f.p), 0)
    draw = ImageDraw.Draw(canvas)
    rng, c = f.rng, f.p / 2
    for _ in range(count):
        ang = rng.uniform(0, 2 * math.pi)
        x, y = c + rng.uniform(-0.6, 0.6) * f.r_px, c + rng.uniform(-0.6, 0.6) * f.r_px
        pts = [(x, y)]
        for _ in range(int(rng.integers(6, 14))):
            ang += rng.normal(0, 0.5)
            step = length * f.r_px / 10
            x, y = x + step * math.cos(ang), y + step * math.sin(ang)
            pts.append((x, y))
            if branch and rng.random() < 0.25:
                ba = ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
                draw.line([(x, y), (x + 2 * step * math.cos(ba), y + 2 * step * math.sin(ba))],
                          fill=200, width=max(1, round(width * 0.7)))
        draw.line(pts, fill=255, width=max(1, round(width)))
    m = np.asarray(canvas, np.float32) / 255.0 * strength * (f.s < 1.0)
    return _mix(rgb, color, m)


def _tex_nv(f: Frame, rng: np.random.Generator) -> np.ndarray:
    base = _lerp((0.62, 0.44, 0.32), (0.33, 0.21, 0.15), rng.uniform(0, 1))
    rgb = f.fill(base)
    grad = rng.uniform(-0.25, 0.2)  # darker (or lighter) centre
    net = f.noise(8.0)
    shade = 1.0 + grad * (0.6 - np.clip(f.s, 0, 1)) + rng.uniform(0.02, 0.06) * np.abs(net)
    return rgb * shade[..., None]


def _tex_mel(f: Frame, rng: np.random.Generator) -> np.ndarray:
    base = _lerp((0.50, 0.33, 0.24), (0.28, 0.17, 0.12), rng.uniform(0, 1))
    rgb = f.fill(base)
    psi = rng.uniform(0, 2 * math.pi)
    asym = (f.u * math.cos(psi) + f.v * math.sin(psi)) * rng.uniform(0.5, 1.5)  # one side darker
    inside = np.clip(1.2 - f.s, 0, 1)
    black = _sigmoid((f.noise(2.5) + asym - rng.uniform(0.0, 0.8)) * 4) * inside
    blue = _sigmoid((f.noise(2.5) - rng.uniform(0.3, 1.0)) * 4) * inside
    light = _sigmoid((f.noise(3.0) - rng.uniform(0.5, 1.2)) * 4)
    rgb = _mix(rgb, (0.12, 0.08, 0.08), black * rng.uniform(0.2, 0.95))
    rgb = _mix(rgb, (0.38, 0.42, 0.55), blue * rng.uniform(0.1, 0.8))  # blue-white veil
    rgb = _mix(rgb, _lerp((0.72, 0.45, 0.38), (0.85, 0.75, 0.72), rng.uniform(0, 1)), light * 0.6)
    net = f.noise(7.0)
    rgb = rgb * (1.0 + rng.uniform(0.05, 0.15) * net)[..., None]  # atypical, uneven network
    if rng.random() < 0.4:
        rgb = _lines(f, rgb, (0.15, 0.10, 0.10), int(rng.integers(3, 9)), 1.5, 0.5, 0.6, False)
    return rgb


def _tex_bkl(f: Frame, rng: np.random.Generator) -> np.ndarray:
    base = _lerp((0.68, 0.54, 0.42), (0.44, 0.32, 0.24), rng.uniform(0, 1))
    rgb = f.fill(base)
    n = f.noise(rng.uniform(6, 12))
    fissure = np.exp(-(n / 0.18) ** 2)  # narrow dark ridges: the cerebriform "stuck-on" surface
    rgb = rgb * (1.0 - rng.uniform(0.05, 0.35) * fissure)[..., None]
    rgb = rgb * (1.0 + 0.06 * f.noise(3.0))[..., None] + 0.04  # waxy sheen
    milia = _sigmoid((f.noise(14.0) - rng.uniform(1.4, 2.0)) * 8)  # bright milia-like cysts
    return _mix(rgb, (0.92, 0.88, 0.78), milia * rng.uniform(0.2, 0.8))


def _tex_bcc(f: Frame, rng: np.random.Generator) -> np.ndarray:
    base = _lerp((0.90, 0.68, 0.64), (0.76, 0.50, 0.50), rng.uniform(0, 1))
    rgb = f.fill(base)
    pearl = _sigmoid((f.noise(3.0) - 0.3) * 3)
    rgb = _mix(rgb, (0.96, 0.91, 0.90), pearl * rng.uniform(0.3, 0.6))  # shiny translucent areas
    if rng.random() < 0.5:  # blue-grey ovoid nests
        nests = _sigmoid((f.noise(4.0) - rng.uniform(1.0, 1.5)) * 6) * (f.s < 0.9)
        rgb = _mix(rgb, (0.32, 0.33, 0.45), nests * 0.8)
    if rng.random() < 0.25:
        return rgb  # no visible vessels
    return _lines(f, rgb, (0.68, 0.10, 0.16), int(rng.integers(1, 9)), rng.uniform(1.0, 2.2),
                  rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.95), True)  # arborizing vessels


def _tex_akiec(f: Frame, rng: np.random.Generator) -> np.ndarray:
    base = _lerp((0.86, 0.52, 0.46), (0.70, 0.34, 0.32), rng.uniform(0, 1))
    rgb = f.fill(base)
    rough = f.noise(rng.uniform(18, 30))
    rgb = rgb * (1.0 + rng.uniform(0.06, 0.12) * rough)[..., None]
    scale = _sigmoid((f.noise(20.0) - rng.uniform(0.6, 1.2)) * 5)  # white-yellow scale
    rgb = _mix(rgb, (0.94, 0.90, 0.80), scale * rng.uniform(0.15, 0.9))
    if rng.random() < 0.3:  # some are pigmented
        pig = _sigmoid((f.noise(3.0) - 0.5) * 4)
        rgb = _mix(rgb, (0.50, 0.33, 0.26), pig * 0.5)
    return rgb


def _tex_df(f: Frame, rng: np.random.Generator) -> np.ndarray:
    base = _lerp((0.66, 0.48, 0.38), (0.45, 0.30, 0.22), rng.uniform(0, 1))
    rgb = f.fill(base) * (1.0 + 0.04 * f.noise(8.0))[..., None]
    centre = rng.uniform(0.3, 0.6)
    s_noisy = f.s + 0.08 * f.noise(3.0)
    white = _sigmoid((centre - s_noisy) / 0.06)  # the pale central scar-like patch
    rgb = _mix(rgb, (0.90, 0.84, 0.80), white * rng.uniform(0.3, 0.95))
    ring = np.exp(-((f.s - rng.uniform(0.65, 0.85)) / 0.12) ** 2)  # delicate peripheral ring
    return rgb * (1.0 - 0.18 * ring)[..., None]


def _tex_vasc(f: Frame, rng: np.random.Generator) -> np.ndarray:
    base = _lerp((0.72, 0.18, 0.26), (0.44, 0.15, 0.38), rng.uniform(0, 1))
    rgb = f.fill(base)
    blobs = f.noise(rng.uniform(4, 8))
    lacunae = _sigmoid((blobs - 0.1) * 6)  # round dark-red/purple lagoons
    rgb = rgb * (1.0 - rng.uniform(0.15, 0.4) * lacunae)[..., None]
    septa = _sigmoid((-0.5 - blobs) * 6)  # paler septa between them
    return _mix(rgb, (0.86, 0.62, 0.66), septa * 0.4)


TEXTURES = {"nv": _tex_nv, "mel": _tex_mel, "bkl": _tex_bkl, "bcc": _tex_bcc, "akiec": _tex_akiec,
            "df": _tex_df, "vasc": _tex_vasc}


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def draw_lesion(dx: str, rng: np.random.Generator, r_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The lesion in its own frame: rgb float32 [P, P, 3] and alpha float32 [P, P] in [0, 1].

    `rng` must be the lesion's generator (fresh for every call); `r_px` the view's radius in pixels."""
    partner = dx
    weight = 0.0
    if rng.random() < BLEND_PROB:
        partner = PARTNERS[dx][int(rng.integers(len(PARTNERS[dx])))]
        weight = _u(rng, BLEND_WEIGHT)
    own, other = SHAPES[dx], SHAPES[partner]
    take = rng.random(4) < weight  # each outline trait comes from the look-alike with p = weight
    irr = _u(rng, (other if take[0] else own).irregular)
    harm = (other if take[1] else own).harmonics
    edge = _u(rng, (other if take[2] else own).edge)
    jag = _u(rng, (other if take[3] else own).jag)
    aspect = _u(rng, own.aspect)
    amps = irr * rng.uniform(0.3, 1.0, harm) / np.arange(1, harm + 1) ** 0.7
    phases = rng.uniform(0, 2 * math.pi, harm)

    extent = 1.0 + amps.sum() + jag * 2.5 + edge + 0.05  # max radius of anything drawn, in R
    p = int(2 * extent * r_px) + 4
    ax = (np.arange(p, dtype=np.float32) - p / 2 + 0.5) / r_px
    u, v = np.meshgrid(ax, ax)  # [P, P] each
    ue = u / math.sqrt(aspect)
    ve = v * math.sqrt(aspect)
    rho = np.sqrt(ue * ue + ve * ve)
    theta = np.arctan2(ve, ue)
    radius = np.ones_like(rho)
    for k in range(harm):
        radius += amps[k] * np.cos((k + 1) * theta + phases[k])
    f = Frame(rng, p, r_px, u, v, rho / np.maximum(radius, 0.2))
    radius = radius + jag * f.noise(6.0)
    f.s = rho / np.maximum(radius, 0.2)
    alpha = np.clip((radius - rho) / edge + 0.5, 0.0, 1.0)

    rgb = TEXTURES[dx](f, rng)
    if weight > 0:
        rgb = rgb * (1 - weight) + TEXTURES[partner](f, rng) * weight
    return rgb.astype(np.float32), alpha.astype(np.float32)


@dataclass(frozen=True)
class Skin:
    tone: RGB
    r: float  # mean lesion radius, fraction of the shorter side


def _hairs(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """float32 [h, w] coverage of dark hair-like curves."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 12))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        ang, curve = rng.uniform(0, 2 * math.pi), rng.normal(0, 0.08)
        pts = [(x, y)]
        for _ in range(20):
            ang += curve
            x, y = x + 0.04 * w * math.cos(ang), y + 0.04 * w * math.sin(ang)
            pts.append((x, y))
        draw.line(pts, fill=int(rng.integers(150, 256)), width=int(rng.integers(1, 3)))
    return np.asarray(canvas, np.float32) / 255.0


def add_grain(img: Image.Image, seed: int, image_number: int) -> Image.Image:
    """Sensor-like grain, from its own generator: the drawing itself is the same in both realisms."""
    rng = np.random.default_rng([seed, image_number, 0x6A1])
    x = np.asarray(img, np.float32) / 255.0
    x = x + rng.standard_normal(x.shape[:2], dtype=np.float32)[..., None] * REAL_GRAIN
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * (REAL_GRAIN / 2)
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def draw_image(dx: str, seed: int, lesion_number: int, image_number: int, size: tuple[int, int],
               with_mask: bool = False, realism: str = "light") -> tuple[bytes, bytes | None]:
    """One image: (baseline JPEG bytes of `size` = (width, height), PNG lesion-mask bytes or None).
    realism "light": quality 90 4:2:0 (small, fast files); "real": as heavy as HAM10000's originals."""
    if realism not in REALISMS:
        raise ValueError(f"realism {realism!r} is not one of {', '.join(REALISMS)}")
    out_w, out_h = size
    w, h = work_size(size)
    lrng, vrng = lesion_rng(seed, lesion_number), image_rng(seed, image_number)
    skin_t = float(lrng.uniform(0, 1))  # the patient's skin: shared by every photo of the lesion
    r_frac = _u(lrng, SHAPES[dx].radius)

    # View: how this photo differs from the other photos of the same lesion.
    scale = vrng.uniform(0.85, 1.15)
    angle = vrng.uniform(0, 360)
    r_px = r_frac * min(w, h) * scale
    rgb, alpha = draw_lesion(dx, lrng, r_px)
    tone = _lerp((0.96, 0.80, 0.74), (0.70, 0.50, 0.40), min(1.0, max(0.0, skin_t + vrng.normal(0, 0.05))))
    # Keep every lesion visibly darker than its skin on average (a pale keratosis on tanned skin
    # would otherwise vanish): the lesion must be findable, for the model and for Grad-CAM checks.
    luma = np.asarray((0.30, 0.59, 0.11), np.float32)
    lesion_l = float((rgb @ luma * alpha).sum() / max(alpha.sum(), 1e-6))
    limit = 0.8 * float(np.dot(tone, luma))
    if lesion_l > limit:
        rgb = rgb * (limit / lesion_l)
    patch = np.concatenate([rgb, alpha[..., None]], axis=2)
    patch8 = Image.fromarray((np.clip(patch, 0, 1) * 255 + 0.5).astype(np.uint8), "RGBA")
    patch8 = patch8.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    pa = np.asarray(patch8, np.float32) / 255.0  # [P', P', 4]

    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = tone
    canvas *= (1.0 + 0.04 * smooth_noise(vrng, h, w, 4))[..., None]
    canvas = _mix(canvas, (0.85, 0.45, 0.45), np.clip(smooth_noise(vrng, h, w, 3), 0, None) * 0.12)

    # Paste the rotated lesion off-centre, clipped at the canvas edges.
    ph, pw = pa.shape[:2]
    cx = w / 2 + vrng.uniform(-0.14, 0.14) * w
    cy = h / 2 + vrng.uniform(-0.14, 0.14) * h
    x0, y0 = round(cx - pw / 2), round(cy - ph / 2)
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x0 + pw), min(h, y0 + ph)
    mask = np.zeros((h, w), np.float32)
    if cx1 > cx0 and cy1 > cy0:
        sub = pa[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        a = sub[..., 3:4]
        canvas[cy0:cy1, cx0:cx1] = canvas[cy0:cy1, cx0:cx1] * (1 - a) + sub[..., :3] * a
        mask[cy0:cy1, cx0:cx1] = sub[..., 3]

    if vrng.random() < 0.4:
        hair = _hairs(vrng, w, h)
        canvas = _mix(canvas, _lerp((0.10, 0.07, 0.06), (0.35, 0.25, 0.20), vrng.uniform()), hair * 0.85)

    # Lighting: uneven illumination, white balance, exposure, and often the dermatoscope's dark rim.
    xn = ((np.arange(w, dtype=np.float32) - w / 2) / (h / 2))[None, :]  # [1, W]
    yn = ((np.arange(h, dtype=np.float32) - h / 2) / (h / 2))[:, None]  # [H, 1]
    phi = vrng.uniform(0, 2 * math.pi)
    light = 1.0 + vrng.uniform(0, 0.15) * (xn * math.cos(phi) + yn * math.sin(phi))  # [H, W]
    if vrng.random() < 0.5:
        d = np.sqrt(xn * xn + yn * yn)
        light = light * (1.0 - 0.92 * np.clip((d - vrng.uniform(1.0, 1.35)) / 0.12, 0, 1))
    cast = vrng.uniform(0.9, 1.1, 3).astype(np.float32) * vrng.uniform(0.85, 1.1)
    canvas = canvas * light[..., None] * cast
    canvas += vrng.standard_normal(canvas.shape, dtype=np.float32) * vrng.uniform(0.004, 0.025)

    img = Image.fromarray((np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    # Focus blur for free: shrink by a random factor; the upscale to the output size smooths it back.
    blur = vrng.uniform(1.0, 1.8)
    if blur > 1.15:
        img = img.resize((max(8, round(w / blur)), max(8, round(h / blur))), Image.Resampling.BILINEAR)
    if img.size != (out_w, out_h):
        img = img.resize((out_w, out_h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if realism == "real":
        add_grain(img, seed, image_number).save(buf, "JPEG", quality=100, subsampling=0, progressive=False,
                                                optimize=False)
    else:
        img.save(buf, "JPEG", quality=JPEG_QUALITY, progressive=False, optimize=False)

    mask_png = None
    if with_mask:
        m = Image.fromarray(mask).resize((out_w, out_h), Image.Resampling.BILINEAR)
        m8 = Image.fromarray(((np.asarray(m) > 0.5) * 255).astype(np.uint8), "L")
        mbuf = io.BytesIO()
        m8.save(mbuf, "PNG")
        mask_png = mbuf.getvalue()
    return buf.getvalue(), mask_png
