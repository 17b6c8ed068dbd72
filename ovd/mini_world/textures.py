"""Backgrounds, object fill textures and unannotated clutter (distractors) shared by both domains."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image

from ovd.mini_world.draw import (
    MAX_ROT,
    SUPERSAMPLE,
    jitter_colour,
    pixel_grid,
    polys_alpha,
    render_alpha,
    shape_polys,
    to_canvas,
)
from ovd.mini_world.vocabulary import SHAPES


def _rand_bg_colour(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.1, 0.9)), np.float32)


def det_background(rng: np.random.Generator, h: int, w: int, kind: int | None = None) -> np.ndarray:
    xx, yy = pixel_grid(h, w)
    c1, c2 = _rand_bg_colour(rng), _rand_bg_colour(rng)
    kind = int(rng.integers(4)) if kind is None else kind
    a = rng.uniform(0, np.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    if kind == 0:  # smooth blotchy noise
        g = int(rng.integers(4, 12))
        small = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8), "L")
        t = np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) / 255.0
    elif kind == 1:  # stripes
        period = rng.uniform(5, 22)
        t = (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    elif kind == 2:  # checkers
        cell = rng.uniform(5, 20)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    else:  # gradient
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    img += rng.normal(0, rng.uniform(0.01, 0.05), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def object_fill(rng: np.random.Generator, rgb, cx: float, cy: float, ext: float, sl: tuple[slice, slice]) -> np.ndarray:
    """Colour field over window ``sl`` for one object: jittered class colour, shading and fill texture."""
    yy, xx = np.mgrid[sl].astype(np.float32)
    xx += 0.5
    yy += 0.5
    hh, ww = xx.shape
    base = jitter_colour(rng, rgb, hue_deg=3.0, val=(0.8, 1.05), desat=0.25)
    a = rng.uniform(0, 2 * np.pi)
    lin = ((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)) / (ext / 2)
    f = 1 + rng.uniform(0.1, 0.3) * lin
    kind = int(rng.integers(4))
    if kind == 1:  # grainy
        f = f * (1 + rng.normal(0, 0.09, (hh, ww)))
    elif kind == 2:  # stripes of a darker tone
        b = rng.uniform(0, np.pi)
        period = rng.uniform(3, 7)
        s = np.sin(2 * np.pi * (xx * math.cos(b) + yy * math.sin(b)) / period) > 0
        f = f * np.where(s, rng.uniform(0.68, 0.82), 1.0)
    field = base[None, None, :] * np.clip(f, 0.55, 1.35)[..., None]
    if kind == 3:  # glossy highlight blended toward white
        hx, hy = cx + rng.uniform(-0.3, 0.3) * ext, cy + rng.uniform(-0.3, 0.3) * ext
        r = np.hypot(xx - hx, yy - hy) / (ext / 2)
        hl = rng.uniform(0.25, 0.45) * np.clip(1 - r, 0, 1) ** 2
        field = field + (1 - field) * hl[..., None]
    return np.clip(field, 0, 1).astype(np.float32)


def clutter_alpha(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    cx, cy = rng.uniform(-5, w + 5), rng.uniform(-5, h + 5)
    if kind == "shape":  # a vocabulary shape, but in gray / black / white (not a class)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        ext = math.exp(rng.uniform(math.log(10), math.log(40)))
        polys = shape_polys(shape, cx, cy, ext, ext, rng.uniform(-MAX_ROT[shape], MAX_ROT[shape]))
        return polys_alpha(polys, w, h)
    if kind == "bar":  # long thin rectangle
        L, t = rng.uniform(15, 60), rng.uniform(2, 5)
        a = math.radians(rng.uniform(0, 180))
        pts = np.array([[-L / 2, -t / 2], [L / 2, -t / 2], [L / 2, t / 2], [-L / 2, t / 2]])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        return polys_alpha([(pts @ rot.T + [cx, cy], 255)], w, h)
    width = float(rng.uniform(1.0, 3.0))
    if kind == "line":
        L, a = rng.uniform(15, 70), rng.uniform(0, 2 * np.pi)
        pts = np.array([[cx, cy], [cx + L * math.cos(a), cy + L * math.sin(a)]])
    elif kind == "scribble":
        n = int(rng.integers(4, 9))
        steps = rng.normal(0, 7, (n, 2))
        pts = np.cumsum(np.vstack([[cx, cy], steps]), 0)
    else:  # arc
        r = rng.uniform(6, 22)
        t0 = rng.uniform(0, 2 * np.pi)
        t = t0 + np.linspace(0, rng.uniform(0.6, 1.6) * np.pi, 16)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    ext = (pts[:, 0].min() - width, pts[:, 1].min() - width, pts[:, 0].max() + width, pts[:, 1].max() + width)

    def fn(draw, ox, oy):
        draw.line(to_canvas(pts, ox, oy), fill=255, width=max(1, round(width * SUPERSAMPLE)), joint="curve")

    return render_alpha(fn, ext, w, h)


def clutter_colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "shape":
        band = int(rng.integers(3))
        g = (rng.uniform(0.02, 0.15), rng.uniform(0.35, 0.65), rng.uniform(0.85, 1.0))[band]
        return np.full(3, g, np.float32) + rng.uniform(-0.02, 0.02, 3).astype(np.float32)
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 1), rng.uniform(0.15, 1)), np.float32)


CLUTTER_KINDS = ("shape", "shape", "bar", "line", "scribble", "arc")
FRONT_KINDS = ("line", "scribble", "arc")
