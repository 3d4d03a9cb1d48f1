"""Numpy rasteriser for the generated world: shapes, handwritten digits, signs, bar charts.

No fonts or assets are read: shapes are analytic masks (rendered at 2× and box-filtered, so
edges are anti-aliased), letters come from the 3×5 bitmap font below, digits are the 8×8
images of ``sklearn.datasets.load_digits`` (shipped inside scikit-learn).

Coordinates are pixels of the final canvas, ``x`` to the right, ``y`` downwards; an object's
``(x, y)`` is its centre. Canvases are ``(H, W, 3)`` uint8 RGB.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

SS = 2  # supersampling factor for analytic shapes

COLOR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 205),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
SHAPE_RADIUS = {"small": 5, "big": 9}  # half the extent of an analytic shape, in pixels
DIGIT_SCALE = {"small": 2, "big": 3}  # 8×8 digit upscaled to 16 or 24 pixels
DIGIT_POOL_SPLIT = 1300  # load_digits images [0, 1300) feed train, [1300, 1797) every other split

# 3×5 bitmap font, rows top to bottom, '#' = ink.
FONT_3X5 = {
    "a": ".#.|#.#|###|#.#|#.#", "b": "##.|#.#|##.|#.#|##.", "c": ".##|#..|#..|#..|.##",
    "d": "##.|#.#|#.#|#.#|##.", "e": "###|#..|##.|#..|###", "f": "###|#..|##.|#..|#..",
    "g": ".##|#..|#.#|#.#|.##", "h": "#.#|#.#|###|#.#|#.#", "i": "###|.#.|.#.|.#.|###",
    "j": "..#|..#|..#|#.#|.#.", "k": "#.#|#.#|##.|#.#|#.#", "l": "#..|#..|#..|#..|###",
    "m": "#.#|###|###|#.#|#.#", "n": "##.|#.#|#.#|#.#|#.#", "o": ".#.|#.#|#.#|#.#|.#.",
    "p": "##.|#.#|##.|#..|#..", "q": ".#.|#.#|#.#|##.|.##", "r": "##.|#.#|##.|#.#|#.#",
    "s": ".##|#..|.#.|..#|##.", "t": "###|.#.|.#.|.#.|.#.", "u": "#.#|#.#|#.#|#.#|###",
    "v": "#.#|#.#|#.#|#.#|.#.", "w": "#.#|#.#|###|###|#.#", "x": "#.#|#.#|.#.|#.#|#.#",
    "y": "#.#|#.#|.#.|.#.|.#.", "z": "###|..#|.#.|#..|###",
}
FONT_SCALE = 2
LETTER_GAP = 2
SIGN_PAD = 3


def glyph(ch: str) -> np.ndarray:
    """(5, 3) bool bitmap of a lowercase letter."""
    rows = FONT_3X5[ch].split("|")
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def word_bitmap(word: str, scale: int = FONT_SCALE) -> np.ndarray:
    """(5·scale, len·3·scale + gaps) bool bitmap of a word."""
    glyphs = [np.kron(glyph(c), np.ones((scale, scale), dtype=bool)) for c in word]
    gap = np.zeros((5 * scale, LETTER_GAP), dtype=bool)
    parts = []
    for i, g in enumerate(glyphs):
        if i:
            parts.append(gap)
        parts.append(g)
    return np.concatenate(parts, axis=1)


def sign_size(word: str) -> tuple[int, int]:
    """(width, height) in pixels of the sign board that holds ``word``."""
    h, w = word_bitmap(word).shape
    return w + 2 * SIGN_PAD, h + 2 * SIGN_PAD


@lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 in [0, 1] and (1797,) int labels from ``load_digits``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def object_radius(obj: dict) -> float:
    """Radius of the disc that encloses an object, used for non-overlapping placement."""
    if obj["shape"] == "digit":
        return 4 * DIGIT_SCALE[obj["size"]] * 1.2
    return SHAPE_RADIUS[obj["size"]] + 0.5


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 dark background of a random grey level."""
    return np.full((size, size, 3), rng.uniform(10, 45), dtype=np.float32)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """(size, size) float32 coverage in [0, 1] of an analytic shape (2× supersampled).

    Only the shape's bounding window is rasterised; the rest of the canvas is 0.
    """
    x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
    x1, y1 = min(int(cx + r) + 2, size), min(int(cy + r) + 2, size)
    cxs = (np.arange(x0 * SS, x1 * SS, dtype=np.float32) + 0.5) / SS  # sub-pixel centres
    cys = (np.arange(y0 * SS, y1 * SS, dtype=np.float32) + 0.5) / SS
    dx = cxs[None, :] - cx  # (1, w·SS)
    dy = cys[:, None] - cy  # (h·SS, 1)
    if shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "ring":
        d2 = dx**2 + dy**2
        m = (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    elif shape == "square":
        m = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    elif shape == "triangle":  # apex up
        m = (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.62)
    elif shape == "cross":
        w = 0.33 * r
        m = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    elif shape == "star":  # five points, apex up
        theta = np.arctan2(dy, dx) + np.pi / 2
        rho = np.sqrt(dx**2 + dy**2)
        k = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at a point, 0 between two
        m = rho <= r * (0.45 + 0.55 * k**2)
    else:
        raise ValueError(f"cannot draw shape {shape!r}")
    h, w = y1 - y0, x1 - x0
    out = np.zeros((size, size), dtype=np.float32)
    out[y0:y1, x0:x1] = m.reshape(h, SS, w, SS).sum(axis=(1, 3), dtype=np.float32) / (SS * SS)  # (h, w)
    return out


def _blend(canvas: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> None:
    canvas *= 1.0 - alpha[..., None]
    canvas += alpha[..., None] * rgb[None, None, :]


def object_rgb(obj: dict, rng: np.random.Generator) -> np.ndarray:
    """(3,) float32 colour of an object with a little per-object jitter."""
    base = np.asarray(COLOR_RGB[obj["color"]], dtype=np.float32)
    return np.clip(base + rng.uniform(-12, 12, 3), 0, 255).astype(np.float32)


def draw_object(canvas: np.ndarray, obj: dict, rng: np.random.Generator) -> None:
    """Draw one object record (shape, color, size, x, y[, digit_index]) in place."""
    rgb = object_rgb(obj, rng)
    size = canvas.shape[0]
    if obj["shape"] == "digit":
        img = digit_images()[0][obj["digit_index"]]
        s = DIGIT_SCALE[obj["size"]]
        a = np.kron(img, np.ones((s, s), dtype=np.float32))  # (8s, 8s)
        h = a.shape[0]
        x0, y0 = int(round(obj["x"] - h / 2)), int(round(obj["y"] - h / 2))
        alpha = np.zeros((size, size), dtype=np.float32)
        alpha[y0 : y0 + h, x0 : x0 + h] = a[: size - y0, : size - x0]
    else:
        alpha = shape_mask(obj["shape"], obj["x"] + 0.5, obj["y"] + 0.5, SHAPE_RADIUS[obj["size"]], size)
    _blend(canvas, alpha, rgb)


def draw_sign(canvas: np.ndarray, sign: dict, rng: np.random.Generator) -> None:
    """Draw a light board centred on (x, y) with the word in dark letters."""
    bits = word_bitmap(sign["word"]).astype(np.float32)
    w, h = sign_size(sign["word"])
    x0, y0 = sign["x"] - w // 2, sign["y"] - h // 2
    board = np.clip(np.array([225, 210, 170], np.float32) + rng.uniform(-15, 15, 3), 0, 255)
    ink = np.array([25, 25, 35], np.float32)
    canvas[y0 : y0 + h, x0 : x0 + w] = board
    region = canvas[y0 + SIGN_PAD : y0 + h - SIGN_PAD, x0 + SIGN_PAD : x0 + w - SIGN_PAD]
    _blend(region, bits, ink)


CHART_UNIT = 7  # pixels per value step
CHART_BAR_W = 7
CHART_GAP = 3
CHART_BASE = 44  # y of the axis line


def draw_chart(canvas: np.ndarray, bars: list[dict], rng: np.random.Generator) -> None:
    """Draw a bar chart: one bar per ``{"color", "value"}``, left to right, on an axis line."""
    size = canvas.shape[1]
    total = len(bars) * CHART_BAR_W + (len(bars) - 1) * CHART_GAP
    x = (size - total) // 2
    canvas[CHART_BASE : CHART_BASE + 1, 3 : size - 3] = 200.0
    canvas[CHART_BASE - 5 * CHART_UNIT - 2 : CHART_BASE + 1, 3:4] = 200.0
    for bar in bars:
        rgb = object_rgb(bar, rng)
        top = CHART_BASE - bar["value"] * CHART_UNIT
        canvas[top:CHART_BASE, x : x + CHART_BAR_W] = rgb
        x += CHART_BAR_W + CHART_GAP


def png_bytes(canvas: np.ndarray) -> bytes:
    """Encode an (H, W, 3) canvas as PNG with fixed options (deterministic bytes)."""
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()
