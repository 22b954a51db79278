"""Drawing primitives of the demo world: shapes as polygons, backgrounds, and the image styles.

Shapes are polygons in unit coordinates (radius about 1, centred near the origin), so a pose
(rotation, scale, stretch, position) is an affine map and detection boxes come from the exact mask.
Masks are rasterised with PIL at :data:`SS` times the final resolution and reduced, which
anti-aliases edges at little cost. Every renderer takes its parameters and a numpy Generator (for
noise) and returns an (H, W, 3) uint8 array; nothing reads global random state, so an image is a pure
function of its seed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Supersampling factor of rasterised masks.
SS = 2

#: A shape part: (n, 2) unit-coordinate points and whether it is a hole cut out of the parts before.
Part = tuple[np.ndarray, bool]


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], axis=1)


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _crescent() -> np.ndarray:
    # Outer circle (r=1 at 0) minus an inner circle (r=0.8 at x=0.45), as one polygon.
    r2, c2 = 0.8, 0.45
    x = (1 - r2**2 + c2**2) / (2 * c2)
    y = math.sqrt(1 - x**2)
    a_out = math.atan2(y, x)
    a_in = math.atan2(y, x - c2)
    t_out = np.linspace(a_out, 2 * math.pi - a_out, 36)
    t_in = np.linspace(2 * math.pi - a_in, a_in, 30)
    outer = np.stack([np.cos(t_out), np.sin(t_out)], axis=1)
    inner = np.stack([c2 + r2 * np.cos(t_in), r2 * np.sin(t_in)], axis=1)
    pts = np.concatenate([outer, inner])
    return pts - [(pts[:, 0].max() + pts[:, 0].min()) / 2, 0.0]


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1) / 16.5
    return pts - (pts.max(axis=0) + pts.min(axis=0)) / 2


def _poly(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


SHAPE_PARTS: dict[str, tuple[Part, ...]] = {
    "circle": ((_circle(r=0.9), False),),
    "square": ((_poly(-0.75, -0.75, 0.75, -0.75, 0.75, 0.75, -0.75, 0.75), False),),
    "triangle": ((_regular(3, 1.0) + [0.0, 0.2], False),),
    "star": ((_star() + [0.0, 0.08], False),),
    "cross": ((_poly(-0.3, -1, 0.3, -1, 0.3, -0.3, 1, -0.3, 1, 0.3, 0.3, 0.3, 0.3, 1, -0.3, 1,
                     -0.3, 0.3, -1, 0.3, -1, -0.3, -0.3, -0.3), False),),
    "ring": ((_circle(r=0.95), False), (_circle(r=0.55), True)),
    "hexagon": ((_regular(6, 0.92, phase=0.0), False),),
    "crescent": ((_crescent(), False),),
    "arrow": ((_poly(-1, -0.22, 0.15, -0.22, 0.15, -0.6, 1, 0, 0.15, 0.6, 0.15, 0.22, -1, 0.22), False),),
    "heart": ((_heart(), False),),
    "diamond": ((_poly(0, -1, 0.62, 0, 0, 1, -0.62, 0), False),),
}


@dataclass(frozen=True)
class Pose:
    """Where a shape lands: rotation (degrees, counter-clockwise), radius and centre (pixels).

    ``stretch`` scales the shape's x axis before rotation (1 = no change).
    """

    angle: float
    radius: float
    cx: float
    cy: float
    stretch: float = 1.0


def place(shape: str, pose: Pose) -> list[tuple[np.ndarray, bool]]:
    """The shape's parts in pixel coordinates (x right, y down)."""
    a = math.radians(pose.angle)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    scale = np.array([pose.stretch, 1.0]) * pose.radius
    return [((pts * scale) @ rot + [pose.cx, pose.cy], hole) for pts, hole in SHAPE_PARTS[shape]]


def _flat(pts: np.ndarray) -> list[float]:
    return (pts * SS).ravel().tolist()


def fill_mask(parts: list[tuple[np.ndarray, bool]], size: int) -> np.ndarray:
    """(size, size) float32 coverage in [0, 1] of the filled shape (holes cut out)."""
    img = Image.new("L", (size * SS, size * SS), 0)
    draw = ImageDraw.Draw(img)
    for pts, hole in parts:
        draw.polygon(_flat(pts), fill=0 if hole else 255)
    return np.asarray(img.reduce(SS), dtype=np.float32) / 255.0


def stroke_mask(strokes: list[np.ndarray], size: int, width: float) -> np.ndarray:
    """(size, size) float32 coverage of closed polylines drawn ``width`` pixels wide."""
    img = Image.new("L", (size * SS, size * SS), 0)
    draw = ImageDraw.Draw(img)
    w = max(1, round(width * SS))
    for pts in strokes:
        closed = np.concatenate([pts, pts[:1]])
        draw.line(_flat(closed), fill=255, width=w, joint="curve")
    return np.asarray(img.reduce(SS), dtype=np.float32) / 255.0


def _upsample(small: np.ndarray, size: int) -> np.ndarray:
    """Bicubic upsampling of a (g, g, 3) array of values in about [-1, 1] to (size, size, 3)."""
    u8 = np.clip(small * 60 + 128, 0, 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(u8).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return (big - 128) / 60


@lru_cache(maxsize=8)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) float32 grids in [-0.5, 0.5] (read-only, shared)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def background(rng: np.random.Generator, size: int, base: tuple[int, int, int], *, gradient: float = 28,
               texture: float = 14) -> np.ndarray:
    """(size, size, 3) float32 photo-like background: base colour, linear light gradient, blotchy texture."""
    yy, xx = _coords(size)
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * xx + np.sin(a) * yy)[..., None] * 2 * gradient * rng.uniform(0.3, 1.0)
    grid = int(rng.integers(3, 9))
    # Mostly light/dark blotches, a little colour: the background keeps the colour it is named by.
    blotch = _upsample(rng.normal(size=(grid, grid, 1)) + 0.4 * rng.normal(size=(grid, grid, 3)), size)
    tint = rng.normal(0, 8, size=3).astype(np.float32)
    return np.asarray(base, np.float32) + tint + ramp + blotch * texture


def composite(base: np.ndarray, colour: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paint ``colour`` ((3,) or (H, W, 3)) over ``base`` with coverage ``mask`` (H, W)."""
    m = mask[..., None]
    return base * (1 - m) + colour * m


def shading(rng: np.random.Generator, size: int, strength: float = 0.18) -> np.ndarray:
    """(size, size, 1) multiplicative light falloff across the object (1 at the centre)."""
    yy, xx = _coords(size)
    a = rng.uniform(0, 2 * math.pi)
    return (1 + strength * 2 * (np.cos(a) * xx + np.sin(a) * yy))[..., None]


def finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Add Gaussian pixel noise (std ``noise``) and convert to uint8."""
    if noise > 0:
        img = img + rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(noise)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Styles


@dataclass(frozen=True)
class PhotoParams:
    """Everything random about a photo-style image except its pixel noise."""

    shape: str
    rgb: tuple[float, float, float]
    pose: Pose
    background: tuple[int, int, int]
    noise: float


def sample_pose(rng: np.random.Generator, size: int, *, radius: tuple[float, float] = (0.24, 0.40),
                spill: float = 0.0, stretch: tuple[float, float] = (0.85, 1.15)) -> Pose:
    """A random pose; ``radius`` is a fraction of the canvas, ``spill`` the fraction of the radius
    allowed outside the canvas (0 keeps the shape inside)."""
    r = rng.uniform(*radius) * size
    lo, hi = r * (1 - spill) + 1, size - r * (1 - spill) - 1
    if lo > hi:
        lo = hi = size / 2
    cx, cy = rng.uniform(lo, hi, size=2)
    return Pose(float(rng.uniform(0, 360)), float(r), float(cx), float(cy), float(rng.uniform(*stretch)))


def sample_photo(rng: np.random.Generator, shape: str, rgb: tuple[int, int, int],
                 background_rgb: tuple[int, int, int], size: int, *, radius: tuple[float, float] = (0.24, 0.40),
                 spill: float = 0.0) -> PhotoParams:
    """Draw pose, colour jitter (brightness and per-channel) and noise level of a photo."""
    pose = sample_pose(rng, size, radius=radius, spill=spill)
    return PhotoParams(shape, jitter_colour(rng, rgb), pose, background_rgb, float(rng.uniform(2.0, 9.0)))


def jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """The colour with random brightness (x0.82..1.12) and per-channel jitter (std 10)."""
    jitter = np.asarray(rgb, np.float64) * rng.uniform(0.82, 1.12) + rng.normal(0, 10, size=3)
    r, g, b = (float(c) for c in np.clip(jitter, 0, 255))
    return r, g, b


def paint(img: np.ndarray, shape: str, rgb: tuple[float, float, float], pose: Pose, rng: np.random.Generator,
          ) -> tuple[np.ndarray, np.ndarray]:
    """Paint a shaded shape over a float image; returns (new image, the shape's coverage mask)."""
    size = img.shape[0]
    mask = fill_mask(place(shape, pose), size)
    obj = np.asarray(rgb, np.float32) * shading(rng, size)
    return composite(img, obj, mask), mask


def render_photo(p: PhotoParams, rng: np.random.Generator, size: int) -> np.ndarray:
    """A photo-style image: textured background, shaded object, pixel noise."""
    img, _ = paint(background(rng, size, p.background), p.shape, p.rgb, p.pose, rng)
    return finish(img, rng, p.noise)


def _wobble(pts: np.ndarray, rng: np.random.Generator, amount: float, step: float = 3.0) -> np.ndarray:
    """A hand-drawn version of a closed polyline: vertices jittered, edges subdivided and bent."""
    pts = pts + rng.normal(0, amount, size=pts.shape)
    out = []
    for a, b in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        n = max(1, int(np.linalg.norm(b - a) / step))
        t = np.arange(n)[:, None] / n
        seg = a + (b - a) * t
        out.append(seg + rng.normal(0, amount * 0.35, size=seg.shape))
    return np.concatenate(out)


def render_sketch(shape: str, rgb: tuple[int, int, int], pose: Pose, rng: np.random.Generator,
                  size: int) -> np.ndarray:
    """A line drawing: off-white paper, one or two wobbly outline strokes in a dark tint, no fill."""
    paper = np.full((size, size, 3), rng.uniform(238, 252), np.float32) + rng.normal(0, 3, size=3)
    ink = np.asarray(rgb, np.float32) * rng.uniform(0.45, 0.65)
    strokes = []
    for _ in range(int(rng.integers(1, 3))):
        strokes += [_wobble(pts, rng, amount=pose.radius * 0.03) for pts, _ in place(shape, pose)]
    mask = stroke_mask(strokes, size, width=rng.uniform(0.9, 1.6)) * rng.uniform(0.75, 1.0)
    return finish(composite(paper, ink, mask), rng, rng.uniform(1.0, 3.0))


#: Plain saturated cartoon backdrops (RGB).
CARTOON_BACKDROPS = ((250, 230, 90), (120, 210, 240), (250, 160, 200), (160, 230, 140), (255, 190, 110),
                     (200, 170, 250), (255, 255, 255), (90, 200, 190))


def render_cartoon(shape: str, rgb: tuple[int, int, int], pose: Pose, rng: np.random.Generator,
                   size: int) -> np.ndarray:
    """A flat cartoon: plain colourful backdrop (sometimes dotted), flat saturated fill, bold outline."""
    far = [c for c in CARTOON_BACKDROPS if np.abs(np.subtract(c, rgb)).sum() > 150]
    back = np.asarray(far[int(rng.integers(len(far)))], np.float32)
    img = np.broadcast_to(back, (size, size, 3)).copy()
    if rng.random() < 0.5:  # polka dots in a lighter tint
        dots = [place("circle", Pose(0, size * 0.05, x, y)) for x, y in rng.uniform(0, size, size=(8, 2))]
        img = composite(img, back * 0.5 + 127, fill_mask([p for d in dots for p in d], size))
    parts = place(shape, pose)
    fill = np.clip(np.asarray(rgb, np.float32) * 1.08, 0, 255)
    img = composite(img, fill, fill_mask(parts, size))
    outline = stroke_mask([pts for pts, _ in parts], size, width=rng.uniform(2.0, 3.0))
    return finish(composite(img, np.zeros(3, np.float32), outline), rng, 0.0)


def render_noise_junk(rng: np.random.Generator, size: int) -> np.ndarray:
    """Junk: pure noise (white, coloured blotches or stripes), no object."""
    kind = int(rng.integers(3))
    if kind == 0:
        return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    if kind == 1:
        blotch = _upsample(rng.normal(size=(6, 6, 3)), size) * 70 + rng.uniform(60, 190, size=3)
        return finish(blotch, rng, 20.0)
    freq = rng.uniform(0.2, 1.2)
    xx = np.arange(size, dtype=np.float32)
    stripes = (np.sin(xx * freq)[None, :, None] * 90 + 128) * np.ones((size, 1, 3), np.float32)
    return finish(stripes * rng.uniform(0.5, 1.0, size=3), rng, 25.0)


JUNK_WORDS = ("SALE", "50% OFF", "FREE", "click here", "lorem ipsum", "LOGIN", "404", "Page not found",
              "www", "subscribe", "NEW", "shop now", "banner", "loading...", "text", "SALE!!!")


def render_text_junk(rng: np.random.Generator, size: int) -> np.ndarray:
    """Junk: a plain background with a few words of text and no object (banners, error pages)."""
    dark = rng.random() < 0.5
    back = rng.uniform(0, 50, size=3) if dark else rng.uniform(200, 255, size=3)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in back))
    draw = ImageDraw.Draw(img)
    for line in range(int(rng.integers(1, 4))):
        word = JUNK_WORDS[int(rng.integers(len(JUNK_WORDS)))]
        font = ImageFont.load_default(size=int(rng.integers(9, 16)))
        ink = tuple(int(c) for c in (rng.uniform(200, 255, size=3) if dark else rng.uniform(0, 90, size=3)))
        xy = (float(rng.uniform(0, size * 0.3)), float(line * size / 3 + rng.uniform(0, size / 8)))
        draw.text(xy, word, fill=ink, font=font)
    return finish(np.asarray(img, np.float32), rng, 3.0)


def near_copy(pixels: np.ndarray, rng: np.random.Generator, max_shift: int = 3) -> np.ndarray:
    """A near duplicate: shifted 1..max_shift pixels (edges replicated) with a tiny colour change."""
    while True:
        dx, dy = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        if dx or dy:
            break
    m = max_shift
    padded = np.pad(pixels.astype(np.float32), ((m, m), (m, m), (0, 0)), mode="edge")
    h, w = pixels.shape[:2]
    shifted = padded[m - dy: m - dy + h, m - dx: m - dx + w]
    changed = shifted * rng.uniform(0.97, 1.03, size=3) + rng.uniform(-3, 3, size=3)
    return np.clip(changed + 0.5, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes (baseline, fixed settings: deterministic for a given libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 pixels of image bytes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def mask_box(mask: np.ndarray, threshold: float = 0.25) -> tuple[int, int, int, int] | None:
    """Tight [x, y, w, h] pixel box of the mask's pixels above ``threshold``; None when empty."""
    ys, xs = np.nonzero(mask > threshold)
    if len(xs) == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
