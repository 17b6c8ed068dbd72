"""Raster primitives: vocabulary shapes as polygons, anti-aliased alpha masks, compositing, colour maths."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # supersampling factor for anti-aliased shape masks


def _unit_polygons(shape: str) -> list[tuple[np.ndarray, int]]:
    """Polygons of ``shape`` in unit coordinates (extent about [-1, 1]); (points, fill) in draw order."""
    if shape in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        circ = np.stack([np.cos(t), np.sin(t)], 1)
        return [(circ, 255)] if shape == "circle" else [(circ, 255), (circ * 0.52, 0)]
    if shape == "square":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.9, 255)]
    if shape == "triangle":
        h = math.sqrt(3) / 2
        return [(np.array([[0, -h], [1, h], [-1, h]], float) * 1.05 + [0, 0.05], 255)]
    if shape == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, 0.45)
        a = -np.pi / 2 + k * np.pi / 5
        return [(np.stack([r * np.cos(a), r * np.sin(a) + 0.1], 1), 255)]
    if shape == "cross":
        w = 0.32
        pts = [
            [-w, -1],
            [w, -1],
            [w, -w],
            [1, -w],
            [1, w],
            [w, w],
            [w, 1],
            [-w, 1],
            [-w, w],
            [-1, w],
            [-1, -w],
            [-w, -w],
        ]
        return [(np.array(pts, float), 255)]
    raise ValueError(shape)


MAX_ROT = {"circle": 0.0, "ring": 0.0, "square": 12.0, "triangle": 15.0, "star": 36.0, "cross": 12.0}


def shape_polys(shape: str, cx: float, cy: float, sx: float, sy: float, angle_deg: float):
    """Polygons of ``shape`` scaled to half-extents (sx/2, sy/2), rotated, centred at (cx, cy)."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    out = []
    for pts, fill in _unit_polygons(shape):
        p = (pts * [sx / 2, sy / 2]) @ rot.T + [cx, cy]
        out.append((p, fill))
    return out


def poly_extent(polys) -> tuple[float, float, float, float]:
    pts = np.concatenate([p for p, _ in polys])
    return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def _region(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> tuple[int, int, int, int] | None:
    rx0, ry0 = max(0, int(math.floor(x0)) - 1), max(0, int(math.floor(y0)) - 1)
    rx1, ry1 = min(w, int(math.ceil(x1)) + 1), min(h, int(math.ceil(y1)) + 1)
    if rx1 <= rx0 or ry1 <= ry0:
        return None
    return rx0, ry0, rx1, ry1


def render_alpha(draw_fn, extent, w: int, h: int) -> np.ndarray:
    """Full-frame float32 alpha (h, w) of what ``draw_fn(draw, ox, oy)`` draws at supersampling SUPERSAMPLE.

    ``draw_fn`` gets an ImageDraw on a canvas covering only the item's region and maps image
    coordinates (x, y) to canvas coordinates with ``(x - ox) * SUPERSAMPLE - 0.5``.
    """
    alpha = np.zeros((h, w), np.float32)
    reg = _region(*extent, w, h)
    if reg is None:
        return alpha
    rx0, ry0, rx1, ry1 = reg
    canvas = Image.new("L", ((rx1 - rx0) * SUPERSAMPLE, (ry1 - ry0) * SUPERSAMPLE), 0)
    draw_fn(ImageDraw.Draw(canvas), rx0, ry0)
    small = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0
    alpha[ry0:ry1, rx0:rx1] = small
    return alpha


def to_canvas(pts: np.ndarray, ox: int, oy: int) -> list[tuple[float, float]]:
    q = (np.asarray(pts, float) - [ox, oy]) * SUPERSAMPLE - 0.5
    return [(float(x), float(y)) for x, y in q]


def polys_alpha(polys, w: int, h: int) -> np.ndarray:
    def fn(draw, ox, oy):
        for pts, fill in polys:
            draw.polygon(to_canvas(pts, ox, oy), fill=fill)

    return render_alpha(fn, poly_extent(polys), w, h)


def alpha_slices(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """Row/column slices of the smallest window holding all non-zero alpha (None if empty)."""
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if len(rows) == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def composite(img: np.ndarray, alpha: np.ndarray, colour, sl: tuple[slice, slice] | None = None) -> None:
    """In place: img = img * (1 - alpha) + colour * alpha, within window ``sl``.

    ``colour`` is an RGB triple, or an (h, w, 3) field covering exactly the window ``sl``.
    """
    if sl is None:
        sl = alpha_slices(alpha)
        if sl is None:
            return
    a = alpha[sl][..., None]
    win = img[sl]
    win *= 1.0 - a
    win += np.asarray(colour, np.float32) * a


def hue_matrix(deg: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue by ``deg`` degrees in YIQ space (luma preserved)."""
    t = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = math.radians(deg)
    r = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return (np.linalg.inv(t) @ r @ t).astype(np.float32)


def apply_matrix(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.einsum("hwk,ck->hwc", img, m)


def jitter_colour(rng: np.random.Generator, rgb, hue_deg: float, val: tuple[float, float], desat: float) -> np.ndarray:
    c = np.asarray(rgb, np.float32) / 255.0
    c = hue_matrix(rng.uniform(-hue_deg, hue_deg)) @ c
    c = c * rng.uniform(*val)
    g = c.mean()
    c = c + (g - c) * rng.uniform(0, desat)
    return np.clip(c, 0, 1).astype(np.float32)


def pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx + 0.5, yy + 0.5


def save_png(arr: np.ndarray, path: str) -> None:
    Image.fromarray(arr, "RGB").save(path, format="PNG", compress_level=4)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def box_from_alpha(alpha: np.ndarray, thr: float = 0.5) -> list[float] | None:
    ys, xs = np.nonzero(alpha >= thr)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
