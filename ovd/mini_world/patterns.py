"""World v3 appearance: a kind's colour field over an object — its palette colour, its pattern in a
second colour (stripes, spots, checks, rings) that turns with the object, per-instance colour jitter,
and in the detection domain the same shading, grain and gloss as v2 objects get."""

from __future__ import annotations

import math

import numpy as np

from ovd.mini_world.draw import jitter_colour
from ovd.mini_world.kinds import OWN_PALETTE, PALETTE

_COLOURS = {**PALETTE, **OWN_PALETTE}  # the novel-only colours exist under novel_attributes=own


def _soft(x: np.ndarray, sharpness: float = 1.6) -> np.ndarray:
    """A soft 0/1 step of a signed field (edges of about one pixel: no hard aliasing)."""
    return np.clip(0.5 + sharpness * x, 0.0, 1.0)


def _pattern_mask(rng: np.random.Generator, pattern: str, u: np.ndarray, v: np.ndarray, ext: float) -> np.ndarray:
    """Where the second colour shows (0..1), in object coordinates (u, v) centred on the object.

    Periods scale with the object (3-4 stripes, rings or cells across it), with a random phase:
    the pattern identifies the kind at any size, but never lines up the same way twice.
    """
    n = rng.uniform(3.0, 4.0)
    period = ext / n
    ph = rng.uniform(0, 2 * np.pi)
    if pattern == "striped":
        return _soft(np.sin(2 * np.pi * v / period + ph) * 2)
    if pattern == "ringed":
        return _soft(np.sin(2 * np.pi * np.hypot(u, v) / period + ph) * 2)
    if pattern == "checkered":
        return _soft(np.sin(np.pi * u / period + ph) * np.sin(np.pi * v / period + ph) * 3)
    if pattern == "spotted":
        cell = period * 1.1
        du = (u / cell + ph / (2 * np.pi)) % 1.0 - 0.5
        dv = (v / cell + ph / (2 * np.pi)) % 1.0 - 0.5
        return _soft((0.3 - np.hypot(du, dv)) * cell)
    # novel-only patterns (novel_attributes=own)
    if pattern == "zigzag":  # stripes across v whose centre line zigzags along u
        tri = np.abs((u / period + ph / (2 * np.pi)) % 1.0 - 0.5) * period
        return _soft(np.sin(2 * np.pi * (v + tri) / period + ph) * 2)
    if pattern == "hatched":  # thin lines both ways: a grid, not checks
        return _soft((np.maximum(np.cos(2 * np.pi * u / period + ph), np.cos(2 * np.pi * v / period + ph)) - 0.8) * 4)
    return np.zeros_like(u)


def kind_field(
    rng: np.random.Generator,
    cls: dict,
    sl: tuple[slice, slice],
    cx: float,
    cy: float,
    ext: float,
    angle: float,
    det: bool,
) -> np.ndarray:
    """Colour field (h, w, 3) over window ``sl`` for one object of kind ``cls`` rotated by ``angle``.

    Web (``det=False``): clean palette colours with small jitter. Detection: larger jitter and
    desaturation, linear shading, and grain or a glossy highlight (the domain gap, as for v2).
    """
    yy, xx = np.mgrid[sl].astype(np.float32)
    xx += 0.5
    yy += 0.5
    a = math.radians(angle)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)  # object axes: the pattern turns with it
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    val, desat = ((0.8, 1.05), 0.25) if det else ((0.92, 1.04), 0.05)
    c1 = jitter_colour(rng, _COLOURS[cls["colour"]], hue_deg=6.0, val=val, desat=desat)
    c2 = jitter_colour(rng, _COLOURS[cls["colour2"]], hue_deg=6.0, val=val, desat=desat)
    t = _pattern_mask(rng, cls["pattern"], u, v, ext)[..., None]
    field = c1[None, None, :] * (1 - t) + c2[None, None, :] * t
    if not det:
        return field.astype(np.float32)
    b = rng.uniform(0, 2 * np.pi)
    f = 1 + rng.uniform(0.1, 0.3) * ((xx - cx) * math.cos(b) + (yy - cy) * math.sin(b)) / (ext / 2)
    finish = int(rng.integers(3))
    if finish == 1:  # grainy
        f = f * (1 + rng.normal(0, 0.09, f.shape))
    field = field * np.clip(f, 0.55, 1.35)[..., None]
    if finish == 2:  # glossy highlight blended toward white
        hx, hy = cx + rng.uniform(-0.3, 0.3) * ext, cy + rng.uniform(-0.3, 0.3) * ext
        hl = rng.uniform(0.25, 0.45) * np.clip(1 - np.hypot(xx - hx, yy - hy) / (ext / 2), 0, 1) ** 2
        field = field + (1 - field) * hl[..., None]
    return np.clip(field, 0, 1).astype(np.float32)
