"""The mini-world: a procedurally generated, seed-deterministic stand-in for CLIP's web data and COCO.

Classes are compositions ``"<colour> <shape>"`` (6 colours x 6 shapes = 36). Two domains:

* **web** (stands for CLIP's web pre-training photos): 64x64 object-centric images, one large
  near-centred object on a clean light background, plus a caption per image.
* **det** (stands for COCO): 160x160 cluttered scenes with several small objects, textured
  backgrounds, shaded/textured object fills, per-image lighting/colour shifts, blur and noise.
  ``train.json`` annotates base classes only (novel objects are in the pixels, unlabelled);
  ``val.json`` annotates everything; an LVIS-format copy of val and TFA-style K-shot novel splits
  are written too.

Every image is rendered from its own ``numpy.random.Generator`` seeded with
``(seed, domain, split, index)``, so the output never depends on worker scheduling: the same preset
and seed give byte-identical JSON and pixel-identical PNGs. See ``docs/mini_world.md``.
"""

from __future__ import annotations

import colorsys
import math
import multiprocessing
import os
import secrets
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ovd.errors import OvdError
from ovd.utils.io import read_json, write_json

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "PRESETS",
    "SHAPES",
    "MiniPreset",
    "generate_mini_world",
    "mini_split",
    "mini_vocabulary",
]

#: Bump whenever the generated content changes, so stale worlds on disk are not reused.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class MiniPreset:
    """Counts and sizes of one mini-world scale."""

    name: str
    web_train_per_class: int
    web_val_per_class: int
    det_train_images: int
    det_val_images: int
    web_size: int = 64
    # Web images that show no class (textures, gray/black/white shapes, scribbles) with their own
    # captions, as a fraction of the class images: real web data is not all objects of the
    # vocabulary, and without such images CLIP cannot tell a background crop from an object.
    web_background_frac: float = 0.25
    det_size: int = 160
    det_objects: tuple[int, int] = (3, 8)  # annotated-class objects per scene (inclusive)
    det_object_px: tuple[int, int] = (14, 48)  # object extent in pixels (log-uniform)
    det_clutter: tuple[int, int] = (2, 6)  # unannotated distractors behind the objects (inclusive)
    fewshot_shots: tuple[int, ...] = (1, 5, 10)
    fewshot_seeds: tuple[int, ...] = (0, 1, 2)


PRESETS: dict[str, MiniPreset] = {
    "smoke": MiniPreset("smoke", web_train_per_class=20, web_val_per_class=5, det_train_images=100, det_val_images=30),
    "bench": MiniPreset(
        "bench", web_train_per_class=400, web_val_per_class=50, det_train_images=1500, det_val_images=400
    ),
}

#: Colour name -> sRGB (0..255). Hues ~0, 52, 125, 183, 228, 285 degrees: well separated.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 215, 20),
    "green": (30, 165, 50),
    "cyan": (20, 200, 215),
    "blue": (35, 70, 225),
    "purple": (160, 40, 205),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

# Latin-square split: class (colour c, shape s) is novel iff (s - c) % 6 == 1 (one per colour and
# shape), or (s - c) % 6 == 4 for even c (three more). => 9 novel; each colour/shape in <= 2 novel.
_NOVEL_OFFSET_ALL = 1
_NOVEL_OFFSET_EVEN = 4

_CAPTION_TEMPLATES = (
    "a photo of {a_name} {name}.",
    "{a_name} {name} on a plain background.",
    "an image of {a_name} {name}.",
    "a picture of {a_name} {name}.",
    "a close-up photo of {a_name} {name}.",
    "{a_colour} {colour} {shape}.",
    "{a_shape} {shape} in {colour}.",
    "a simple photo of {a_name} {name}.",
)

_DOMAIN_WEB, _DOMAIN_DET = 1, 2
_SPLIT_CODES = {"train": 1, "val": 2}
_SS = 4  # supersampling factor for anti-aliased shape masks
_MAX_OCCLUDED = 0.15  # at most this fraction of an annotated object's pixels may be covered
_MAX_BOX_COVERED = 0.3  # ... and at most this fraction of its box
_POOL_MIN_TASKS = 2000  # use worker processes only for worlds at least this big
_WORLD_FILES = (
    "world.json",
    "split.json",
    "web/train.json",
    "web/val.json",
    "det/train.json",
    "det/train_oracle.json",
    "det/val.json",
    "det/val_lvis.json",
)


# --------------------------------------------------------------------------------------------
# vocabulary and split
# --------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _is_novel(ci: int, si: int) -> bool:
    d = (si - ci) % len(SHAPES)
    return d == _NOVEL_OFFSET_ALL or (d == _NOVEL_OFFSET_EVEN and ci % 2 == 0)


def mini_vocabulary() -> list[dict]:
    """All 36 classes in fixed order: ids 1..36, colour-major."""
    vocab = []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            vocab.append(
                {
                    "id": ci * len(SHAPES) + si + 1,
                    "name": f"{colour} {shape}",
                    "colour": colour,
                    "shape": shape,
                }
            )
    return vocab


def mini_split() -> dict:
    """``{"base": [27 names], "novel": [9 names]}`` in vocabulary order."""
    base, novel = [], []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            (novel if _is_novel(ci, si) else base).append(f"{colour} {shape}")
    return {"base": base, "novel": novel}


def _coco_categories() -> list[dict]:
    return [
        {
            "id": c["id"],
            "name": c["name"],
            "supercategory": c["shape"],
            "colour": c["colour"],
            "shape": c["shape"],
        }
        for c in mini_vocabulary()
    ]


# --------------------------------------------------------------------------------------------
# geometry and rendering helpers
# --------------------------------------------------------------------------------------------
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


_MAX_ROT = {"circle": 0.0, "ring": 0.0, "square": 12.0, "triangle": 15.0, "star": 36.0, "cross": 12.0}


def _shape_polys(shape: str, cx: float, cy: float, sx: float, sy: float, angle_deg: float):
    """Polygons of ``shape`` scaled to half-extents (sx/2, sy/2), rotated, centred at (cx, cy)."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    out = []
    for pts, fill in _unit_polygons(shape):
        p = (pts * [sx / 2, sy / 2]) @ rot.T + [cx, cy]
        out.append((p, fill))
    return out


def _poly_extent(polys) -> tuple[float, float, float, float]:
    pts = np.concatenate([p for p, _ in polys])
    return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def _region(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> tuple[int, int, int, int] | None:
    rx0, ry0 = max(0, int(math.floor(x0)) - 1), max(0, int(math.floor(y0)) - 1)
    rx1, ry1 = min(w, int(math.ceil(x1)) + 1), min(h, int(math.ceil(y1)) + 1)
    if rx1 <= rx0 or ry1 <= ry0:
        return None
    return rx0, ry0, rx1, ry1


def _render_alpha(draw_fn, extent, w: int, h: int) -> np.ndarray:
    """Full-frame float32 alpha (h, w) of what ``draw_fn(draw, ox, oy)`` draws at supersampling _SS.

    ``draw_fn`` gets an ImageDraw on a canvas covering only the item's region and maps image
    coordinates (x, y) to canvas coordinates with ``(x - ox) * _SS - 0.5``.
    """
    alpha = np.zeros((h, w), np.float32)
    reg = _region(*extent, w, h)
    if reg is None:
        return alpha
    rx0, ry0, rx1, ry1 = reg
    canvas = Image.new("L", ((rx1 - rx0) * _SS, (ry1 - ry0) * _SS), 0)
    draw_fn(ImageDraw.Draw(canvas), rx0, ry0)
    small = np.asarray(canvas.reduce(_SS), dtype=np.float32) / 255.0
    alpha[ry0:ry1, rx0:rx1] = small
    return alpha


def _to_canvas(pts: np.ndarray, ox: int, oy: int) -> list[tuple[float, float]]:
    q = (np.asarray(pts, float) - [ox, oy]) * _SS - 0.5
    return [(float(x), float(y)) for x, y in q]


def _polys_alpha(polys, w: int, h: int) -> np.ndarray:
    def fn(draw, ox, oy):
        for pts, fill in polys:
            draw.polygon(_to_canvas(pts, ox, oy), fill=fill)

    return _render_alpha(fn, _poly_extent(polys), w, h)


def _alpha_slices(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """Row/column slices of the smallest window holding all non-zero alpha (None if empty)."""
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if len(rows) == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _composite(img: np.ndarray, alpha: np.ndarray, colour, sl: tuple[slice, slice] | None = None) -> None:
    """In place: img = img * (1 - alpha) + colour * alpha, within window ``sl``.

    ``colour`` is an RGB triple, or an (h, w, 3) field covering exactly the window ``sl``.
    """
    if sl is None:
        sl = _alpha_slices(alpha)
        if sl is None:
            return
    a = alpha[sl][..., None]
    win = img[sl]
    win *= 1.0 - a
    win += np.asarray(colour, np.float32) * a


def _hue_matrix(deg: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue by ``deg`` degrees in YIQ space (luma preserved)."""
    t = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = math.radians(deg)
    r = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return (np.linalg.inv(t) @ r @ t).astype(np.float32)


def _apply_matrix(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.einsum("hwk,ck->hwc", img, m)


def _jitter_colour(rng: np.random.Generator, rgb, hue_deg: float, val: tuple[float, float], desat: float) -> np.ndarray:
    c = np.asarray(rgb, np.float32) / 255.0
    c = _hue_matrix(rng.uniform(-hue_deg, hue_deg)) @ c
    c = c * rng.uniform(*val)
    g = c.mean()
    c = c + (g - c) * rng.uniform(0, desat)
    return np.clip(c, 0, 1).astype(np.float32)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx + 0.5, yy + 0.5


def _save_png(arr: np.ndarray, path: str) -> None:
    Image.fromarray(arr, "RGB").save(path, format="PNG", compress_level=4)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def _box_from_alpha(alpha: np.ndarray, thr: float = 0.5) -> list[float] | None:
    ys, xs = np.nonzero(alpha >= thr)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


# --------------------------------------------------------------------------------------------
# web domain
# --------------------------------------------------------------------------------------------
def _web_caption(rng: np.random.Generator, cls: dict) -> str:
    t = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    cap = t.format(
        name=cls["name"],
        colour=cls["colour"],
        shape=cls["shape"],
        a_name=_article(cls["name"]),
        a_colour=_article(cls["colour"]),
        a_shape=_article(cls["shape"]),
    )
    return cap[0].lower() + cap[1:]


def _render_web(rng: np.random.Generator, cls: dict, size: int) -> np.ndarray:
    h = w = size
    xx, yy = _grid(h, w)
    # clean light neutral background: plain or a gentle linear/radial grade
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
    img = np.clip(img, 0, 1).astype(np.float32)
    # one large, near-centred object
    shape = cls["shape"]
    ext = rng.uniform(0.5, 0.85) * size
    ang = rng.uniform(-_MAX_ROT[shape], _MAX_ROT[shape])
    polys = _shape_polys(shape, 0.0, 0.0, ext, ext, ang)
    x0, y0, x1, y1 = _poly_extent(polys)
    cx = np.clip(w / 2 + rng.uniform(-3, 3), 1 - x0, w - 1 - x1)
    cy = np.clip(h / 2 + rng.uniform(-3, 3), 1 - y0, h - 1 - y1)
    polys = [(p + [cx, cy], f) for p, f in polys]
    colour = _jitter_colour(rng, COLOURS[cls["colour"]], hue_deg=3.0, val=(0.95, 1.03), desat=0.05)
    _composite(img, _polys_alpha(polys, w, h), colour)
    img += rng.normal(0, 1.0 / 255, img.shape).astype(np.float32)
    return _to_uint8(img)


_TEXTURE_NAMES = ("a blotchy texture", "a striped pattern", "a checkered pattern", "a smooth gradient")
_NEUTRAL = {"black": 0.08, "gray": 0.5, "white": 0.93}
_STROKE_NAMES = {"bar": "a thin bar", "line": "a thin line", "scribble": "a scribble", "arc": "a curved line"}


def _render_web_nonclass(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A web image of something outside the vocabulary, with a caption that says what it is."""
    kind = int(rng.integers(3))
    if kind == 0:  # a texture / background, nothing on it
        tex = int(rng.integers(len(_TEXTURE_NAMES)))
        img = _det_background(rng, size, size, kind=tex)
        cap = f"a photo of {_TEXTURE_NAMES[tex]}."
    else:
        img = np.full((size, size, 3), rng.uniform(0.86, 0.99), np.float32)
        if kind == 1:  # a vocabulary shape in a neutral colour: not a class ("gray star")
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            tone = list(_NEUTRAL)[int(rng.integers(len(_NEUTRAL)))]
            if tone == "white":
                img = _det_background(rng, size, size, kind=3) * 0.6
            ext = rng.uniform(0.5, 0.85) * size
            polys = _shape_polys(shape, size / 2, size / 2, ext, ext, rng.uniform(-_MAX_ROT[shape], _MAX_ROT[shape]))
            _composite(img, _polys_alpha(polys, size, size), np.full(3, _NEUTRAL[tone], np.float32))
            cap = f"a photo of {_article(tone)} {tone} {shape}."
        else:  # strokes
            stroke = ("bar", "line", "scribble", "arc")[int(rng.integers(4))]
            colour = _clutter_colour(rng, stroke)
            for _ in range(int(rng.integers(1, 4))):
                _composite(img, _clutter_alpha(rng, stroke, size, size), colour)
            cap = f"a photo of {_STROKE_NAMES[stroke]}."
    img += rng.normal(0, 1.0 / 255, img.shape).astype(np.float32)
    return _to_uint8(img), cap


# --------------------------------------------------------------------------------------------
# detection domain
# --------------------------------------------------------------------------------------------
def _rand_bg_colour(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.1, 0.9)), np.float32)


def _det_background(rng: np.random.Generator, h: int, w: int, kind: int | None = None) -> np.ndarray:
    xx, yy = _grid(h, w)
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


def _object_fill(
    rng: np.random.Generator, rgb, cx: float, cy: float, ext: float, sl: tuple[slice, slice]
) -> np.ndarray:
    """Colour field over window ``sl`` for one object: jittered class colour, shading and fill texture."""
    yy, xx = np.mgrid[sl].astype(np.float32)
    xx += 0.5
    yy += 0.5
    hh, ww = xx.shape
    base = _jitter_colour(rng, rgb, hue_deg=3.0, val=(0.8, 1.05), desat=0.25)
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


def _clutter_alpha(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    cx, cy = rng.uniform(-5, w + 5), rng.uniform(-5, h + 5)
    if kind == "shape":  # a vocabulary shape, but in gray / black / white (not a class)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        ext = math.exp(rng.uniform(math.log(10), math.log(40)))
        polys = _shape_polys(shape, cx, cy, ext, ext, rng.uniform(-_MAX_ROT[shape], _MAX_ROT[shape]))
        return _polys_alpha(polys, w, h)
    if kind == "bar":  # long thin rectangle
        L, t = rng.uniform(15, 60), rng.uniform(2, 5)
        a = math.radians(rng.uniform(0, 180))
        pts = np.array([[-L / 2, -t / 2], [L / 2, -t / 2], [L / 2, t / 2], [-L / 2, t / 2]])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        return _polys_alpha([(pts @ rot.T + [cx, cy], 255)], w, h)
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
        draw.line(_to_canvas(pts, ox, oy), fill=255, width=max(1, round(width * _SS)), joint="curve")

    return _render_alpha(fn, ext, w, h)


def _clutter_colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "shape":
        band = int(rng.integers(3))
        g = (rng.uniform(0.02, 0.15), rng.uniform(0.35, 0.65), rng.uniform(0.85, 1.0))[band]
        return np.full(3, g, np.float32) + rng.uniform(-0.02, 0.02, 3).astype(np.float32)
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 1), rng.uniform(0.15, 1)), np.float32)


_CLUTTER_KINDS = ("shape", "shape", "bar", "line", "scribble", "arc")
_FRONT_KINDS = ("line", "scribble", "arc")


class _Placed:
    """An annotated object in a scene under construction, tracking how much later items cover it."""

    def __init__(self, cid: int, alpha: np.ndarray, extent: tuple[float, float, float, float]):
        self.cid = cid
        self.extent = extent  # geometric (polygon) extent x0, y0, x1, y1
        self.alpha = alpha
        self.area = float(alpha.sum())
        self.free = np.ones_like(alpha)  # product of (1 - alpha) of everything drawn on top
        ys, xs = np.nonzero(alpha >= 0.5)
        self.box = (slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))

    def fits_under(self, alpha: np.ndarray) -> bool:
        """Would this object stay clearly visible if ``alpha`` were drawn on top of it?"""
        if not alpha[self.box].any():
            return True
        free = self.free * (1 - alpha)
        if float((self.alpha * free).sum()) < (1 - _MAX_OCCLUDED) * self.area:
            return False
        if float(1 - free[self.box].mean()) > _MAX_BOX_COVERED:
            return False
        # extremities (star points, cross arms, corners) stay visible: the visible box keeps >= 90%
        # of the full box's width and height
        ys, xs = np.nonzero((self.alpha[self.box] * free[self.box]) >= 0.5)
        if len(xs) == 0:
            return False
        full_h, full_w = self.box[0].stop - self.box[0].start, self.box[1].stop - self.box[1].start
        return int(xs.max()) - int(xs.min()) + 1 >= 0.9 * full_w and int(ys.max()) - int(ys.min()) + 1 >= 0.9 * full_h

    def cover(self, alpha: np.ndarray) -> None:
        self.free *= 1 - alpha


def _render_det(rng: np.random.Generator, cat_ids: list[int], p: MiniPreset, extents: list | None = None):
    """One detection scene. Returns (uint8 image, [(category_id, [x, y, w, h])], n_dropped).

    If ``extents`` is a list, the polygon extent (x0, y0, x1, y1) of each returned object is
    appended to it (for tests of box tightness).
    """
    vocab = {c["id"]: c for c in mini_vocabulary()}
    h = w = p.det_size
    img = _det_background(rng, h, w)
    n_back = int(rng.integers(p.det_clutter[0], p.det_clutter[1] + 1))
    for _ in range(n_back):
        kind = _CLUTTER_KINDS[int(rng.integers(len(_CLUTTER_KINDS)))]
        _composite(img, _clutter_alpha(rng, kind, h, w), _clutter_colour(rng, kind))

    placed: list[_Placed] = []

    def fits(alpha: np.ndarray) -> bool:
        return all(o.fits_under(alpha) for o in placed)

    lo, hi = math.log(p.det_object_px[0]), math.log(p.det_object_px[1])
    dropped = 0
    for cid in cat_ids:
        cls = vocab[cid]
        shape = cls["shape"]
        ext = math.exp(rng.uniform(lo, hi))
        ok = False
        for attempt in range(40):
            if attempt and attempt % 8 == 0:
                ext = max(p.det_object_px[0], ext * 0.85)
            asp = rng.uniform(0.9, 1.1)
            sx, sy = ext * asp, ext / asp
            polys = _shape_polys(shape, 0.0, 0.0, sx, sy, rng.uniform(-_MAX_ROT[shape], _MAX_ROT[shape]))
            x0, y0, x1, y1 = _poly_extent(polys)
            cx = rng.uniform(1 - x0, w - 1 - x1)
            cy = rng.uniform(1 - y0, h - 1 - y1)
            polys = [(q + [cx, cy], f) for q, f in polys]
            alpha = _polys_alpha(polys, w, h)
            if fits(alpha):
                ok = True
                break
        if not ok:
            dropped += 1
            continue
        for o in placed:
            o.cover(alpha)
        placed.append(_Placed(cid, alpha, _poly_extent(polys)))
        sl = _alpha_slices(alpha)
        _composite(img, alpha, _object_fill(rng, COLOURS[cls["colour"]], cx, cy, ext, sl), sl)

    # a few thin distractors in front, never hiding more than allowed of any object
    for _ in range(int(rng.integers(0, 3))):
        kind = _FRONT_KINDS[int(rng.integers(len(_FRONT_KINDS)))]
        alpha = _clutter_alpha(rng, kind, h, w)
        colour = _clutter_colour(rng, kind)
        if fits(alpha):
            for o in placed:
                o.cover(alpha)
            _composite(img, alpha, colour)

    objects = []
    for o in placed:
        box = _box_from_alpha(o.alpha * o.free)
        if box is None:  # cannot happen with >= 85% visible, but never emit an empty box
            dropped += 1
            continue
        objects.append((o.cid, box))
        if extents is not None:
            extents.append(o.extent)

    # per-image lighting and colour shift, then blur and sensor noise
    img = img * (1 + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)  # colour cast
    img = _apply_matrix(img, _hue_matrix(rng.uniform(-10, 10)))
    img = img * rng.uniform(0.8, 1.15)
    mean = float(img.mean())
    img = (img - mean) * rng.uniform(0.75, 1.1) + mean
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.2)
    pil = Image.fromarray(_to_uint8(img), "RGB").filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    out = np.asarray(pil, np.float32) + rng.normal(0, rng.uniform(2, 8), (h, w, 3))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), objects, dropped


# --------------------------------------------------------------------------------------------
# task execution (deterministic per image, independent of worker scheduling)
# --------------------------------------------------------------------------------------------
def _image_rng(seed: int, domain: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, domain, _SPLIT_CODES[split], index])


def _run_task(task: tuple) -> Any:
    kind, seed, split, index, payload, preset, path = task
    if kind == "web":
        rng = _image_rng(seed, _DOMAIN_WEB, split, index)
        if payload is None:  # no class in the picture
            arr, caption = _render_web_nonclass(rng, preset.web_size)
        else:
            arr = _render_web(rng, payload, preset.web_size)
            caption = _web_caption(rng, payload)
        _save_png(arr, path)
        return caption
    rng = _image_rng(seed, _DOMAIN_DET, split, index)
    arr, objects, dropped = _render_det(rng, payload, preset)
    _save_png(arr, path)
    return objects, dropped


def _det_layout(seed: int, split: str, n_images: int, p: MiniPreset) -> list[list[int]]:
    """Category ids per scene: object counts uniform in det_objects, classes balanced over all 36."""
    rng = np.random.default_rng([seed, _DOMAIN_DET, _SPLIT_CODES[split], 10**9])
    counts = rng.integers(p.det_objects[0], p.det_objects[1] + 1, n_images)
    total = int(counts.sum())
    n_cls = len(COLOURS) * len(SHAPES)
    seq: list[int] = []
    while len(seq) < total:
        seq.extend(int(i) + 1 for i in rng.permutation(n_cls))
    out, k = [], 0
    for c in counts:
        out.append(seq[k : k + int(c)])
        k += int(c)
    return out


# --------------------------------------------------------------------------------------------
# annotation files
# --------------------------------------------------------------------------------------------
def _box_segmentation(b: list[float]) -> list[list[float]]:
    x, y, w, h = b
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _fewshot(oracle: dict, novel_ids: list[int], k: int, s: int) -> dict:
    """TFA-style: for each novel class pick images until exactly k instances of it are annotated."""
    rng = np.random.default_rng(s)
    per_cls_img: dict[int, Counter] = defaultdict(Counter)
    by_img_cls: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for a in oracle["annotations"]:
        per_cls_img[a["category_id"]][a["image_id"]] += 1
        by_img_cls[(a["image_id"], a["category_id"])].append(a)
    names = {c["id"]: c["name"] for c in oracle["categories"]}
    chosen_anns: list[dict] = []
    chosen_imgs: set[int] = set()
    for cid in novel_ids:
        img_ids = sorted(per_cls_img[cid])
        picked = None
        for _ in range(200):
            order = rng.permutation(len(img_ids))
            sel, n = [], 0
            for j in order:
                im = img_ids[int(j)]
                m = per_cls_img[cid][im]
                if n + m > k:
                    continue
                sel.append(im)
                n += m
                if n == k:
                    break
            if n == k:
                picked = sel
                break
        if picked is None:
            raise OvdError(
                f"mini-world too small for {k}-shot: cannot pick exactly {k} instances of "
                f"'{names[cid]}' from {sum(per_cls_img[cid].values())} in det/train"
            )
        for im in picked:
            chosen_imgs.add(im)
            chosen_anns.extend(by_img_cls[(im, cid)])
    images = [im for im in oracle["images"] if im["id"] in chosen_imgs]
    anns = sorted(chosen_anns, key=lambda a: a["id"])
    return {
        "info": {"description": f"mini-world {k}-shot novel split, sampling seed {s}"},
        "images": images,
        "annotations": anns,
        "categories": oracle["categories"],
    }


def _lvis_val(val: dict, train: dict) -> dict:
    img_count: Counter = Counter()
    inst_count: Counter = Counter()
    seen = set()
    for a in train["annotations"]:
        inst_count[a["category_id"]] += 1
        if (a["image_id"], a["category_id"]) not in seen:
            seen.add((a["image_id"], a["category_id"]))
            img_count[a["category_id"]] += 1
    cats = []
    for c in val["categories"]:
        n = img_count[c["id"]]
        freq = "r" if n <= 10 else ("c" if n <= 100 else "f")
        cats.append(
            {
                "id": c["id"],
                "name": c["name"],
                "synset": "mini." + c["name"].replace(" ", "_"),
                "synonyms": [c["name"]],
                "def": f"a {c['shape']} coloured {c['colour']}",
                "frequency": freq,
                "image_count": n,
                "instance_count": inst_count[c["id"]],
                "supercategory": c["supercategory"],
                "colour": c["colour"],
                "shape": c["shape"],
            }
        )
    present: dict[int, set] = defaultdict(set)
    for a in val["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    all_ids = [c["id"] for c in val["categories"]]
    images = []
    for im in val["images"]:
        images.append(
            {
                **im,
                "neg_category_ids": [i for i in all_ids if i not in present[im["id"]]],
                "not_exhaustive_category_ids": [],
            }
        )
    anns = [{k: v for k, v in a.items() if k != "iscrowd"} for a in val["annotations"]]
    return {
        "info": {"description": "mini-world det val in LVIS format (frequency from det/train.json)"},
        "images": images,
        "annotations": anns,
        "categories": cats,
    }


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _check_args(preset: Any, seed: Any) -> MiniPreset:
    if not isinstance(preset, str) or preset not in PRESETS:
        raise OvdError(f"unknown mini-world preset {preset!r}; expected one of: {', '.join(PRESETS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OvdError(f"mini-world seed must be a non-negative integer, got {seed!r}")
    return PRESETS[preset]


def _existing_world(out: Path, preset: str, seed: int) -> dict | None:
    """The summary of a complete matching world in ``out``, else None."""
    wj = out / "world.json"
    if not wj.is_file():
        return None
    try:
        world = read_json(wj, "mini-world description")
    except OvdError:
        return None
    if not isinstance(world, dict) or (world.get("version"), world.get("preset"), world.get("seed")) != (
        GENERATOR_VERSION,
        preset,
        int(seed),
    ):
        return None
    p = PRESETS[preset]
    files = list(_WORLD_FILES) + [f"det/fewshot/{k}shot_seed{s}.json" for k in p.fewshot_shots for s in p.fewshot_seeds]
    if not all((out / f).is_file() for f in files):
        return None
    return world.get("summary")


def generate_mini_world(
    out_dir: str | os.PathLike,
    preset: str = "smoke",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Generate the mini-world into ``out_dir`` and return its summary (counts).

    If ``out_dir`` already holds a complete world of the same preset, seed and generator version,
    it is reused as is (its summary is returned; nothing is rewritten) unless ``overwrite`` is set.
    A non-empty ``out_dir`` holding anything else is an error unless ``overwrite=True``, which
    replaces it. The world is written into a temporary sibling directory and renamed into place at
    the end, so an interrupted run never leaves a half-written world.
    """
    p = _check_args(preset, seed)
    seed = int(seed)
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise OvdError(f"mini-world output {out} exists and is not a directory")
    if out.is_dir() and not overwrite:
        summary = _existing_world(out, preset, seed)
        if summary is not None:
            return summary
        if any(out.iterdir()):
            raise OvdError(
                f"mini-world output {out} is not empty and holds no complete '{preset}' world "
                f"with seed {seed} (generator v{GENERATOR_VERSION}); choose an empty directory "
                f"or pass overwrite=True (--overwrite) to replace it"
            )
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / f".{out.name}.tmp-{token}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        summary = _generate_into(tmp, p, seed, progress)
        if out.exists():
            old = out.parent / f".{out.name}.old-{token}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise OvdError(f"cannot write mini-world to {out}: {e.strerror or e} ({e.filename or out})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _generate_into(root: Path, p: MiniPreset, seed: int, progress: bool) -> dict:
    from tqdm import tqdm

    vocab = mini_vocabulary()
    split = mini_split()
    novel_names = set(split["novel"])
    novel_ids = [c["id"] for c in vocab if c["name"] in novel_names]
    categories = _coco_categories()
    n_cls = len(vocab)

    tasks: list[tuple] = []
    web_meta: dict[str, list[dict]] = {}
    for sp, per_cls in (("train", p.web_train_per_class), ("val", p.web_val_per_class)):
        (root / "web" / "images" / sp).mkdir(parents=True)
        recs = []
        for i in range(per_cls * n_cls):
            cls = vocab[i % n_cls]
            fn = f"{sp}/{i + 1:06d}.png"
            recs.append(
                {
                    "id": i + 1,
                    "file_name": fn,
                    "width": p.web_size,
                    "height": p.web_size,
                    "category_id": cls["id"],
                }
            )
            tasks.append(("web", seed, sp, i, cls, p, str(root / "web" / "images" / fn)))
        n_class = per_cls * n_cls
        for j in range(round(p.web_background_frac * n_class)):
            i = n_class + j
            fn = f"{sp}/{i + 1:06d}.png"
            recs.append({"id": i + 1, "file_name": fn, "width": p.web_size, "height": p.web_size, "category_id": 0})
            tasks.append(("web", seed, sp, i, None, p, str(root / "web" / "images" / fn)))
        web_meta[sp] = recs
    det_meta: dict[str, list[dict]] = {}
    for sp, n_img in (("train", p.det_train_images), ("val", p.det_val_images)):
        (root / "det" / "images" / sp).mkdir(parents=True)
        layout = _det_layout(seed, sp, n_img, p)
        recs = []
        for i in range(n_img):
            fn = f"{sp}/{i + 1:06d}.png"
            recs.append({"id": i + 1, "file_name": fn, "width": p.det_size, "height": p.det_size})
            tasks.append(("det", seed, sp, i, layout[i], p, str(root / "det" / "images" / fn)))
        det_meta[sp] = recs

    workers = min(2, os.cpu_count() or 1)
    bar = tqdm(total=len(tasks), desc=f"mini-world {p.name}", unit="img", disable=not progress)
    try:
        if workers > 1 and len(tasks) >= _POOL_MIN_TASKS:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(workers) as pool:
                results = []
                for r in pool.imap(_run_task, tasks, chunksize=32):
                    results.append(r)
                    bar.update(1)
        else:
            results = []
            for t in tasks:
                results.append(_run_task(t))
                bar.update(1)
    finally:
        bar.close()

    # ---- web records
    k = 0
    for sp in ("train", "val"):
        for rec in web_meta[sp]:
            rec["caption"] = results[k]
            k += 1
        write_json(root / "web" / f"{sp}.json", {"images": web_meta[sp], "categories": categories})

    # ---- detection annotations
    dropped = 0
    det_files: dict[str, dict] = {}
    novel_set = set(novel_ids)
    for sp in ("train", "val"):
        anns = []
        for rec in det_meta[sp]:
            objects, n_drop = results[k]
            k += 1
            dropped += n_drop
            for cid, box in objects:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": rec["id"],
                        "category_id": cid,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                        "segmentation": _box_segmentation(box),
                    }
                )
        info = {"description": f"mini-world det {sp} (preset {p.name}, seed {seed})"}
        full = {"info": info, "images": det_meta[sp], "annotations": anns, "categories": categories}
        if sp == "train":
            det_files["train_oracle"] = full
            base_anns = [a for a in anns if a["category_id"] not in novel_set]
            det_files["train"] = {
                **full,
                "info": {"description": info["description"] + ", base classes only"},
                "annotations": base_anns,
            }
        else:
            det_files["val"] = full
    for name in ("train", "train_oracle", "val"):
        write_json(root / "det" / f"{name}.json", det_files[name])
    lvis = _lvis_val(det_files["val"], det_files["train"])
    write_json(root / "det" / "val_lvis.json", lvis)
    fewshot_summary = {}
    for kk in p.fewshot_shots:
        for s in p.fewshot_seeds:
            fs = _fewshot(det_files["train_oracle"], novel_ids, kk, s)
            write_json(root / "det" / "fewshot" / f"{kk}shot_seed{s}.json", fs)
            fewshot_summary[f"{kk}shot_seed{s}"] = {
                "images": len(fs["images"]),
                "annotations": len(fs["annotations"]),
            }
    write_json(root / "split.json", split)

    oracle = det_files["train_oracle"]["annotations"]
    freq = Counter(c["frequency"] for c in lvis["categories"])
    summary = {
        "classes": n_cls,
        "base_classes": len(split["base"]),
        "novel_classes": len(split["novel"]),
        "web_image_size": p.web_size,
        "web_train_images": len(web_meta["train"]),
        "web_val_images": len(web_meta["val"]),
        "web_train_nonclass_images": sum(r["category_id"] == 0 for r in web_meta["train"]),
        "web_val_nonclass_images": sum(r["category_id"] == 0 for r in web_meta["val"]),
        "det_image_size": p.det_size,
        "det_train_images": len(det_meta["train"]),
        "det_val_images": len(det_meta["val"]),
        "det_train_annotations": len(det_files["train"]["annotations"]),
        "det_train_objects": len(oracle),
        "det_train_novel_objects": sum(a["category_id"] in novel_set for a in oracle),
        "det_val_annotations": len(det_files["val"]["annotations"]),
        "det_dropped_objects": dropped,
        "lvis_frequency": {f: freq.get(f, 0) for f in ("r", "c", "f")},
        "fewshot": fewshot_summary,
    }
    write_json(
        root / "world.json",
        {
            "version": GENERATOR_VERSION,
            "preset": p.name,
            "seed": seed,
            "params": asdict(p),
            "classes": mini_vocabulary(),
            "split": split,
            "summary": summary,
        },
    )
    return summary


def derive_shape_split(world: str | os.PathLike, shapes: list[str], name: str | None = None) -> dict:
    """A second split of an existing world in which every class of ``shapes`` is novel.

    The default Latin-square split makes each novel class a new combination of a base colour and a
    base shape, so a detector can name novel objects from the text embeddings alone. Holding out a
    whole shape removes that shortcut: no base class shows the shape, and what it looks like can
    only come from CLIP (distillation). Same images; writes ``split_<name>.json`` and
    ``det/train_<name>.json`` (the oracle annotations minus the new novel classes). Idempotent.
    """
    root = Path(world)
    bad = [s for s in shapes if s not in SHAPES]
    if not shapes or bad:
        raise OvdError(f"unknown shape(s) {bad or shapes}; choose from {', '.join(SHAPES)}")
    if len(set(shapes)) >= len(SHAPES):
        raise OvdError("at least one shape must stay base")
    name = name or "heldout_" + "_".join(shapes)
    oracle = read_json(root / "det" / "train_oracle.json", "mini-world oracle annotations")
    vocab = mini_vocabulary()
    novel = [c["name"] for c in vocab if c["shape"] in shapes]
    split = {"base": [c["name"] for c in vocab if c["name"] not in novel], "novel": novel}
    novel_ids = {c["id"] for c in vocab if c["name"] in novel}
    train = {
        **oracle,
        "info": {"description": f"{oracle['info']['description']}, split {name}: base classes only"},
        "annotations": [a for a in oracle["annotations"] if a["category_id"] not in novel_ids],
    }
    write_json(root / f"split_{name}.json", split)
    write_json(root / "det" / f"train_{name}.json", train, indent=None)
    return {
        "split": str(root / f"split_{name}.json"),
        "train_json": str(root / "det" / f"train_{name}.json"),
        "base": len(split["base"]),
        "novel": len(novel),
        "train_annotations": len(train["annotations"]),
        "novel_objects_unlabelled": len(oracle["annotations"]) - len(train["annotations"]),
    }
