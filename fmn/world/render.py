"""Procedural rendering of world images: shapes in a style and colour, and cartoon faces.

Everything is drawn with numpy on a 2x supersampled grid, then box-filtered down, so
edges are anti-aliased like a real (slightly soft) photo. Deterministic given the rng.
"""

from __future__ import annotations

import numpy as np

from fmn.world.concepts import COLOURS, TINY, World

SUPERSAMPLE = 2  # anti-aliasing factor; 2 is enough at 32 px and keeps generation fast

SKINS = {
    "light": (250, 215, 180),
    "tan": (215, 160, 110),
    "brown": (140, 90, 55),
    "pale": (255, 235, 225),
    "green": (150, 215, 120),
    "blue": (140, 185, 245),
}
HAIRS = {
    "blonde": (245, 215, 80),
    "black": (30, 25, 25),
    "red": (200, 60, 20),
    "brown": (110, 65, 30),
    "purple": (150, 50, 200),
    "white": (235, 235, 235),
    "pink": (240, 120, 180),
    "grey": (135, 135, 140),  # crowd-world: white hair vanished on the light backgrounds
}
# crowd-world's realistic skin tones, spaced so that neighbours stay apart after the 8x8
# latent bottleneck (tiny-world keeps its own cartoon palette above)
CROWD_SKINS = {
    "pale": (255, 232, 220),
    "light": (238, 196, 150),
    "tan": (200, 145, 95),
    "brown": (140, 88, 52),
    "dark": (82, 52, 34),
}


def _grid(n: int, cx: float, cy: float, scale: float, angle: float) -> tuple[np.ndarray, ...]:
    """Coordinates (u, v) in the shape's frame: centre (cx, cy), radius `scale`, rotated."""
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    x, y = (xs / n - cx) / scale, (ys / n - cy) / scale
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in its own frame (v points down, radius ~1)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 0.95
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.78
    if shape == "triangle":
        return (v <= 0.75) & (abs(u) <= (v + 0.95) / 1.7 * 1.0)
    if shape == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        return r <= 0.42 + 0.58 * np.abs(np.cos(2.5 * theta)) ** 2
    if shape == "heart":
        x, y = 1.25 * u, -1.25 * v + 0.25
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if shape == "cross":
        return ((abs(u) <= 0.3) & (abs(v) <= 0.92)) | ((abs(v) <= 0.3) & (abs(u) <= 0.92))
    if shape == "crescent":
        return (r <= 0.95) & (np.hypot(u - 0.45, v + 0.2) > 0.8)
    if shape == "arrow":
        shaft = (abs(v) <= 0.24) & (u >= -0.92) & (u <= 0.15)
        head = (u >= 0.1) & (u <= 0.95) & (abs(v) <= (0.95 - u) * 0.95)
        return shaft | head
    if shape == "diamond":  # a tall rhombus: unlike a square it stays pointed when rotated
        return abs(u) / 0.72 + abs(v) / 1.05 <= 1
    if shape == "bolt":  # a lightning zigzag: two slanted strokes joined by a bar
        upper = (v >= -1.0) & (v <= 0.1) & (abs(u - 0.4 + (v + 1.0) * 0.5) <= 0.28)
        lower = (v >= -0.1) & (v <= 1.0) & (abs(u - 0.1 + (v + 0.1) * 0.5) <= 0.28)
        bar = (abs(v) <= 0.2) & (abs(u) <= 0.45)
        return upper | lower | bar
    if shape == "drop":  # a teardrop: round below, pointed above
        return (np.hypot(u, v - 0.3) <= 0.62) | (
            (v < 0.3) & (v >= -0.95) & (abs(u) <= (v + 0.95) * 0.5)
        )
    if shape == "house":  # a square body under a triangular roof
        body = (abs(u) <= 0.62) & (v >= -0.1) & (v <= 0.85)
        roof = (v < -0.1) & (v >= -0.95) & (abs(u) <= (v + 0.95) * 1.05)
        return body | roof
    raise ValueError(f"unknown shape {shape!r}")


def _downsample(img: np.ndarray) -> np.ndarray:
    n = img.shape[0] // SUPERSAMPLE
    return img.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, *img.shape[2:]).mean(axis=(1, 3))


def _paint(canvas: np.ndarray, mask: np.ndarray, colour) -> None:
    canvas[mask] = np.asarray(colour, dtype=np.float32)


def _light_background(n: int, rng: np.random.Generator) -> np.ndarray:
    tint = rng.uniform(215, 250, size=3).astype(np.float32)
    return np.broadcast_to(tint, (n, n, 3)).copy()


def render_object(
    shape: str, style: str, colour: str, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """An image of `shape` drawn in `style` and `colour`; returns (uint8 HxWx3, mask HxW)."""
    n = size * SUPERSAMPLE
    cx, cy = rng.uniform(0.42, 0.58, size=2)
    scale = rng.uniform(0.3, 0.38)
    angle = rng.uniform(-0.25, 0.25)
    u, v = _grid(n, cx, cy, scale, angle)
    mask = shape_mask(shape, u, v)
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    white = np.float32(250)
    ys, xs = np.mgrid[0:n, 0:n] / SUPERSAMPLE
    canvas = _light_background(n, rng)
    phase = rng.uniform(0, 8, size=2)
    if style == "flat":
        _paint(canvas, mask, rgb)
    elif style == "stripes":
        on = ((xs + ys + phase[0]) // 3.5) % 2 == 0
        _paint(canvas, mask, white)
        _paint(canvas, mask & on, rgb)
    elif style == "dots":
        _paint(canvas, mask, rgb)
        gx, gy = (xs + phase[0]) % 6 - 3, (ys + phase[1]) % 6 - 3
        _paint(canvas, mask & (np.hypot(gx, gy) < 1.7), white)
    elif style == "checker":
        on = (((xs + phase[0]) // 4) + ((ys + phase[1]) // 4)) % 2 == 0
        _paint(canvas, mask, white)
        _paint(canvas, mask & on, rgb)
    elif style == "outline":
        inner = shape_mask(shape, u * 1.35, v * 1.35)
        _paint(canvas, mask, rgb)
        _paint(canvas, inner, white)
    elif style == "gradient":
        t = np.clip((v + 1) / 2, 0, 1)[..., None]
        fill = (1 - t) * rgb + t * white
        canvas[mask] = fill[mask]
    elif style == "night":
        canvas[:] = rng.uniform(15, 45, size=3).astype(np.float32)
        _paint(canvas, mask, rgb)
    elif style == "shadow":
        off = 0.12 / scale
        _paint(canvas, shape_mask(shape, u - off, v - off), np.float32(70))
        _paint(canvas, mask, rgb)
    elif style == "frame":  # a thick dark border around the whole picture
        _paint(canvas, mask, rgb)
        edge = np.minimum(
            np.minimum(xs, ys), np.minimum(n / SUPERSAMPLE - xs, n / SUPERSAMPLE - ys)
        )
        _paint(canvas, edge < 3.5, np.float32(45))
    elif style == "split":  # the left half filled, the right half white
        _paint(canvas, mask, white)
        _paint(canvas, mask & (u < 0), rgb)
    elif style == "inverted":  # the background takes the colour, the shape is white
        canvas[:] = rgb
        _paint(canvas, mask, white)
    elif style == "neon":  # a glowing coloured rim on a black background
        inner = shape_mask(shape, u * 1.4, v * 1.4)
        canvas[:] = np.float32(10)
        _paint(canvas, mask & ~inner, np.minimum(rgb + 40, 255))
    else:
        raise ValueError(f"unknown style {style!r}")
    img = _downsample(canvas)
    img += rng.normal(0, 3.0, size=img.shape)  # a little sensor noise, like a photo
    return np.clip(img, 0, 255).astype(np.uint8), _downsample(mask.astype(np.float32))


def render_face(
    name: str, size: int, rng: np.random.Generator, world: World = TINY
) -> tuple[np.ndarray, np.ndarray]:
    """A cartoon portrait of identity `name`; returns (uint8 HxWx3, face mask HxW).
    A world with a `clothes` attribute draws a smaller head over coloured shoulders."""
    a = world.identities[name]
    n = size * SUPERSAMPLE
    clothed = "clothes" in a
    cx = rng.uniform(0.45, 0.55)
    if clothed:
        cy, s = rng.uniform(0.4, 0.46), rng.uniform(0.25, 0.28)
    else:
        cy, s = rng.uniform(0.5, 0.58), rng.uniform(0.3, 0.35)
    u, v = _grid(n, cx, cy, s, rng.uniform(-0.12, 0.12))
    canvas = _light_background(n, rng)
    skin = (CROWD_SKINS if clothed else SKINS)[a["skin"]]
    hair = HAIRS[a["hair"]]
    head = (u / 0.85) ** 2 + (v / 1.0) ** 2 <= 1
    # where the hair ends on the forehead: lower on crowd-world's smaller heads, so hair
    # colour covers enough pixels to survive the 8x8 latents
    fringe = -0.3 if clothed else -0.5
    if clothed:  # shoulders and neck below the head
        _paint(canvas, (u / 1.75) ** 2 + ((v - 2.25) / 1.2) ** 2 <= 1, COLOURS[a["clothes"]])
        _paint(canvas, (abs(u) <= 0.3) & (v > 0.5) & (v < 1.15), skin)
    style = a["hairstyle"]
    if style == "long":  # hair falls behind the head down to the shoulders
        _paint(
            canvas,
            (abs(u) <= 1.15) & (v >= -1.15) & (v <= 1.1) & ~head | (head & (v < fringe + 0.05)),
            hair,
        )
    if style == "bun":
        _paint(canvas, np.hypot(u, v + 1.25) <= 0.45, hair)
    _paint(canvas, head, skin)
    if style in ("short", "long", "bun"):
        _paint(canvas, head & (v < fringe), hair)
    if style == "spiky":
        spikes = (v < -0.55) & (v > -1.35) & (abs(((u + 1) * 3) % 2 - 1) < (v + 1.35) * 1.2)
        _paint(canvas, (spikes & (abs(u) < 0.9)) | (head & (v < fringe - 0.05)), hair)
    eye_l = np.hypot(u + 0.35, v + 0.1) <= 0.14
    eye_r = np.hypot(u - 0.35, v + 0.1) <= 0.14
    if a.get("extra") == "glasses":
        rim = lambda x0: abs(np.hypot(u - x0, v + 0.1) - 0.26) <= 0.08  # noqa: E731
        _paint(
            canvas, rim(-0.35) | rim(0.35) | ((abs(v + 0.1) < 0.05) & (abs(u) < 0.12)), (20, 20, 20)
        )
    _paint(canvas, eye_l | eye_r, (20, 20, 30))
    mouth = (abs(np.hypot(u, v - 0.15) - 0.42) <= 0.07) & (v > 0.35)
    _paint(canvas, mouth, (150, 30, 40))
    if a["extra"] == "beard":
        _paint(canvas, head & (v > 0.45) & ~mouth, hair)
    if a["extra"] == "bow":
        bow = (abs(v + 0.95) <= abs(u - 0.6) * 0.8 + 0.05) & (abs(u - 0.6) <= 0.35)
        _paint(canvas, bow, (230, 40, 120))
    if a["extra"] == "hat":
        _paint(
            canvas,
            ((abs(u) <= 0.65) & (v >= -1.55) & (v <= -0.6))
            | ((abs(u) <= 1.1) & (abs(v + 0.62) <= 0.1)),
            (30, 30, 90),
        )
    img = _downsample(canvas)
    img += rng.normal(0, 3.0, size=img.shape)
    face = _downsample(((u / 0.85) ** 2 + v**2 <= 1.2).astype(np.float32))
    return np.clip(img, 0, 255).astype(np.uint8), face
