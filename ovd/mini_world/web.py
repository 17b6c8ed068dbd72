"""Web-domain images (CLIP's stand-in pre-training photos): one large centred class object on a clean
background (a v2 shape or a v3 kind), or an image of something outside the vocabulary (the same in
both versions: textures, strokes, and plain geometric shapes in black, gray or white)."""

from __future__ import annotations

import colorsys
import math

import numpy as np

from ovd.mini_world.draw import (
    MAX_ROT,
    alpha_slices,
    composite,
    jitter_colour,
    pixel_grid,
    poly_extent,
    polys_alpha,
    shape_polys,
    to_uint8,
)
from ovd.mini_world.kinds import kind_silhouette
from ovd.mini_world.patterns import kind_field
from ovd.mini_world.scene import camera
from ovd.mini_world.silhouettes import instance_polys
from ovd.mini_world.textures import CLUTTER_KINDS, clutter_alpha, clutter_colour, det_background
from ovd.mini_world.vocabulary import COLOURS, SHAPES, article


def _web_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Clean light neutral background: plain or a gentle linear/radial grade."""
    h = w = size
    xx, yy = pixel_grid(h, w)
    base = rng.uniform(0.86, 0.99)
    tint = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.06), 1.0), np.float32)
    kind = int(rng.integers(3))
    if kind == 0:
        shade = np.ones((h, w), np.float32)
    elif kind == 1:
        a = rng.uniform(0, 2 * np.pi)
        shade = 1 + rng.uniform(0.02, 0.06) * ((xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)) / (w / 2)
    else:
        r = np.hypot(xx - w / 2, yy - h / 2) / (w / 2)
        shade = 1 - rng.uniform(0.02, 0.07) * r
    img = (base * tint)[None, None, :] * shade[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def _centred(rng: np.random.Generator, polys, size: int):
    """``polys`` (centred on the origin) moved near the image centre (+-3 px), kept inside the image."""
    x0, y0, x1, y1 = poly_extent(polys)
    cx = np.clip(size / 2 + rng.uniform(-3, 3), 1 - x0, size - 1 - x1)
    cy = np.clip(size / 2 + rng.uniform(-3, 3), 1 - y0, size - 1 - y1)
    return [(p + [cx, cy], f) for p, f in polys], float(cx), float(cy)


def render_web(rng: np.random.Generator, cls: dict, size: int) -> np.ndarray:
    """A v2 web image: one large, near-centred, flat-coloured shape."""
    img = _web_background(rng, size)
    shape = cls["shape"]
    ext = rng.uniform(0.5, 0.85) * size
    ang = rng.uniform(-MAX_ROT[shape], MAX_ROT[shape])
    polys, _, _ = _centred(rng, shape_polys(shape, 0.0, 0.0, ext, ext, ang), size)
    colour = jitter_colour(rng, COLOURS[cls["colour"]], hue_deg=3.0, val=(0.95, 1.03), desat=0.05)
    composite(img, polys_alpha(polys, size, size), colour)
    img += rng.normal(0, 1.0 / 255, img.shape).astype(np.float32)
    return to_uint8(img)


def render_web_kind(rng: np.random.Generator, cls: dict, size: int, style: str = "clean") -> tuple[np.ndarray, float]:
    """A v3 web image: one large, near-centred object of kind ``cls`` in its clean palette and pattern.

    Returns the image and the object's extent as a fraction of the image side (for size words).
    ``style="scene"`` (the ``web_style`` knob) draws a detection-like crop instead.
    """
    if style == "scene":
        return _render_web_kind_scene(rng, cls, size)
    img = _web_background(rng, size)
    frac = rng.uniform(0.5, 0.85)
    ext = frac * size
    polys, ang = instance_polys(rng, *kind_silhouette(cls), ext, cls.get("aspect"))
    polys, cx, cy = _centred(rng, polys, size)
    alpha = polys_alpha(polys, size, size)
    sl = alpha_slices(alpha)
    composite(img, alpha, kind_field(rng, cls, sl, cx, cy, ext, ang, det=False), sl)
    img += rng.normal(0, 1.0 / 255, img.shape).astype(np.float32)
    return to_uint8(img), float(frac)


def _render_web_kind_scene(rng: np.random.Generator, cls: dict, size: int) -> tuple[np.ndarray, float]:
    """A web image that looks like a detection crop: the detection domain's textured background and
    clutter, a smaller off-centre object with the shaded detection fill, then the camera shift."""
    img = det_background(rng, size, size)
    for _ in range(int(rng.integers(1, 4))):
        kind = CLUTTER_KINDS[int(rng.integers(len(CLUTTER_KINDS)))]
        composite(img, clutter_alpha(rng, kind, size, size), clutter_colour(rng, kind))
    frac = rng.uniform(0.35, 0.8)
    ext = frac * size
    polys, ang = instance_polys(rng, *kind_silhouette(cls), ext, cls.get("aspect"))
    x0, y0, x1, y1 = poly_extent(polys)
    cx = rng.uniform(1 - x0, max(1 - x0, size - 1 - x1))
    cy = rng.uniform(1 - y0, max(1 - y0, size - 1 - y1))
    polys = [(q + [cx, cy], f) for q, f in polys]
    alpha = polys_alpha(polys, size, size)
    sl = alpha_slices(alpha)
    composite(img, alpha, kind_field(rng, cls, sl, cx, cy, ext, ang, det=True), sl)
    return camera(rng, img), float(frac)


_TEXTURE_NAMES = ("a blotchy texture", "a striped pattern", "a checkered pattern", "a smooth gradient")
_NEUTRAL = {"black": 0.08, "gray": 0.5, "white": 0.93}
_STROKE_NAMES = {"bar": "a thin bar", "line": "a thin line", "scribble": "a scribble", "arc": "a curved line"}


def render_web_nonclass(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A web image of something outside the vocabulary, with a caption that says what it is."""
    kind = int(rng.integers(3))
    if kind == 0:  # a texture / background, nothing on it
        tex = int(rng.integers(len(_TEXTURE_NAMES)))
        img = det_background(rng, size, size, kind=tex)
        cap = f"a photo of {_TEXTURE_NAMES[tex]}."
    else:
        img = np.full((size, size, 3), rng.uniform(0.86, 0.99), np.float32)
        if kind == 1:  # a vocabulary shape in a neutral colour: not a class ("gray star")
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            tone = list(_NEUTRAL)[int(rng.integers(len(_NEUTRAL)))]
            if tone == "white":
                img = det_background(rng, size, size, kind=3) * 0.6
            ext = rng.uniform(0.5, 0.85) * size
            polys = shape_polys(shape, size / 2, size / 2, ext, ext, rng.uniform(-MAX_ROT[shape], MAX_ROT[shape]))
            composite(img, polys_alpha(polys, size, size), np.full(3, _NEUTRAL[tone], np.float32))
            cap = f"a photo of {article(tone)} {tone} {shape}."
        else:  # strokes
            stroke = ("bar", "line", "scribble", "arc")[int(rng.integers(4))]
            colour = clutter_colour(rng, stroke)
            for _ in range(int(rng.integers(1, 4))):
                composite(img, clutter_alpha(rng, stroke, size, size), colour)
            cap = f"a photo of {_STROKE_NAMES[stroke]}."
    img += rng.normal(0, 1.0 / 255, img.shape).astype(np.float32)
    return to_uint8(img), cap
