"""World v3 silhouettes: eight families of procedurally generated contours (one per group), a kind's
unit polygons from its family parameters, and the per-instance variation (aspect, rotation, a
smooth warp).

A silhouette is a list of ``(points (n, 2), fill)`` polygons drawn in order (fill 255 adds, 0 cuts a
hole), normalised so that its bounding box is centred on the origin with a longer side of 2 — the
same convention as the v2 shapes, so the preset's object extents mean the same thing.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from ovd.mini_world.knobs import ASPECT_MAX_ROTATION

Polys = list[tuple[np.ndarray, int]]

_N_POLAR = 120  # vertices of a radial contour: smooth at 48 px x 4 supersampling


def _polar(r: np.ndarray) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, len(r), endpoint=False) - np.pi / 2  # first vertex points up
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _theta(n: int = _N_POLAR) -> np.ndarray:
    return np.linspace(0, 2 * np.pi, n, endpoint=False)


def _ellipse(cx: float, cy: float, rx: float, ry: float, rot: float = 0.0, n: int = 40) -> np.ndarray:
    t = _theta(n)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def _bar(p0, p1, width: float) -> np.ndarray:
    """A rectangle of ``width`` from p0 to p1 (legs, stems, antennae)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    nrm = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-9) * width / 2
    return np.stack([p0 + nrm, p1 + nrm, p1 - nrm, p0 - nrm])


def _band(line: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """A thick stroke along a centre line (m, 2) with a half-width per point: one closed polygon."""
    d = np.gradient(line, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], 1) / np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)[:, None]
    hw = np.asarray(half_width, float)[:, None]
    return np.concatenate([line + nrm * hw, (line - nrm * hw)[::-1]])


# --------------------------------------------------------------------------------- the families
def _flower(n: int, depth: float, sharp: float, hole: float = 0.0) -> Polys:
    """n rounded petals: r = (1 - depth) + depth |cos(n t / 2)|^sharp (sharp < 1: fat petals)."""
    r = (1 - depth) + depth * np.abs(np.cos(n * _theta() / 2)) ** sharp
    out = [(_polar(r), 255)]
    return out + [(_ellipse(0, 0, hole, hole), 0)] if hole else out


def _spiky(n: int, inner: float, alt: float = 1.0) -> Polys:
    """An n-pointed star with straight edges; ``alt`` < 1 shortens every other point."""
    k = np.arange(2 * n)
    outer = np.where((k // 2) % 2 == 0, 1.0, alt)
    r = np.where(k % 2 == 0, outer, inner)
    return [(_polar(r), 255)]


def _gear(n: int, tooth: float, duty: float, hole: float = 0.0) -> Polys:
    """A disc with n square teeth of height ``tooth`` covering ``duty`` of the rim."""
    phase = (_theta(max(_N_POLAR, 12 * n)) * n / (2 * np.pi)) % 1.0
    r = np.where(phase < duty, 1.0, 1.0 - tooth)
    out = [(_polar(r), 255)]
    return out + [(_ellipse(0, 0, hole, hole), 0)] if hole else out


def _pebble(points: tuple) -> Polys:
    """A smooth blob: the control polygon ``points`` rounded by four rounds of corner cutting."""
    p = np.asarray(points, float)
    for _ in range(4):  # Chaikin: each edge (a, b) -> 3/4 a + 1/4 b, 1/4 a + 3/4 b
        q = np.roll(p, -1, axis=0)
        p = np.stack([0.75 * p + 0.25 * q, 0.25 * p + 0.75 * q], 1).reshape(-1, 2)
    return [(p, 255)]


def _bug(legs: int, body: tuple, head: float, antennae: bool, wings: bool = False, segments: int = 1) -> Polys:
    """A body (ellipse, or ``segments`` circles in a row) with a head, leg pairs, antennae, wings."""
    bw, bl = body
    out: Polys = []
    if wings:
        out += [(_ellipse(s * bw * 1.6, -0.1, bw * 1.5, bl * 0.45, rot=s * 0.5), 255) for s in (-1, 1)]
    if segments == 1:
        out.append((_ellipse(0, 0.1, bw, bl), 255))
    else:
        ys = np.linspace(-bl * 0.55, bl, segments)
        out += [
            (_ellipse(0, y, bw * (0.7 + 0.3 * i / (segments - 1)), bl / segments * 1.1), 255) for i, y in enumerate(ys)
        ]
    top = -bl + 0.1
    if head:
        out.append((_ellipse(0, top - head * 0.6, head, head), 255))
    for i in range(legs):
        y = 0.1 + bl * (-0.45 + 0.9 * i / max(legs - 1, 1))
        for s in (-1, 1):
            knee = (s * (bw + 0.3), y - 0.12)
            out.append((_bar((0, y), knee, 0.14), 255))
            out.append((_bar(knee, (s * (bw + 0.45), y + 0.25), 0.12), 255))
    if antennae:
        y0 = top - 2 * head * 0.6
        out += [(_bar((0, y0 + 0.1), (s * 0.35, y0 - 0.35), 0.11), 255) for s in (-1, 1)]
    return out


def _leaf(
    width: float, power: float, lobes: int = 0, lobe_amp: float = 0.0, stem: float = 0.3, skew: float = 1.0
) -> Polys:
    """A leaf along the y axis, stem down: half-width width * sin(pi s^skew)^power at s in [0, 1] from
    the base (skew < 1: widest near the base), with ``lobes`` bumps per side."""
    s = np.linspace(0, 1, 61)
    w = width * np.sin(np.pi * s**skew) ** power
    if lobes:
        w = w * (1 - lobe_amp + lobe_amp * np.abs(np.sin(np.pi * lobes * s)))
    y = 1 - 2 * s
    right = np.stack([w, y], 1)
    outline = np.concatenate([right, (right * [-1, 1])[::-1][1:-1]])
    out: Polys = [(outline, 255)]
    return out + [(_bar((0, 0.9), (0.05, 1 + stem), 0.1), 255)] if stem else out


def _leaflets(n: int, width: float, spread: float, stem: float) -> Polys:
    """n leaves fanned out from one point (clover, maple), on a stem."""
    out: Polys = [(_bar((0, 0), (0, stem), 0.12), 255)] if stem else []
    for a in np.linspace(-spread, spread, n):
        leaf = _leaf(width, 0.8, stem=0.0)[0][0] * 0.5 + [0, -0.5]
        c, s_ = math.cos(a), math.sin(a)
        out.append((leaf @ np.array([[c, s_], [-s_, c]]), 255))
    return out


def _mushroom(cap: str, w: float, h: float, stem_w: float, stem_h: float) -> Polys:
    """A cap (or crown) of half-width w and height h on a stem of width stem_w and height stem_h."""
    out: Polys = [(_bar((0, -0.05), (0, stem_h), stem_w), 255)]
    t = np.linspace(0, np.pi, 31)
    if cap == "dome":
        out.append((np.stack([w * np.cos(t), -h * np.sin(t)], 1), 255))
    elif cap == "cone":
        out.append((np.array([[-w, 0], [0, -h], [w, 0]], float), 255))
    elif cap == "bell":  # rounded top flaring into a lip
        x = w * np.cos(t) * (0.75 + 0.25 * np.abs(np.cos(t)) ** 0.5)
        out.append((np.stack([x, -h * np.sin(t) ** 0.7], 1), 255))
    elif cap == "ball":
        out.append((_ellipse(0, -h, w, h), 255))
    elif cap == "pine":  # three stacked triangles
        out += [(np.array([[-w * f, y + h / 2.2], [0, y - h / 2.2], [w * f, y + h / 2.2]]), 255)
                for f, y in ((1.0, -h / 3), (0.78, -h), (0.55, -1.6 * h))]  # fmt: skip
    elif cap == "cloud":  # a crown of three discs
        out += [
            (_ellipse(x, y, w * 0.55, w * 0.55), 255)
            for x, y in ((-w * 0.45, -h * 0.6), (w * 0.45, -h * 0.6), (0, -h * 1.3))
        ]
    elif cap == "tiers":  # two domes stacked, the upper one smaller
        out += [
            (np.stack([f * w * np.cos(t), y - f * h * np.sin(t)], 1), 255) for f, y in ((1.0, 0.0), (0.62, -h * 0.8))
        ]
    else:
        raise ValueError(cap)
    return out


def _polyline(points, m: int = 64) -> np.ndarray:
    """``m`` points evenly spaced by arc length along a polyline."""
    p = np.asarray(points, float)
    s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(p, axis=0).T))])
    u = np.linspace(0, s[-1], m)
    return np.stack([np.interp(u, s, p[:, 0]), np.interp(u, s, p[:, 1])], 1)


def _worm_line(path: str) -> np.ndarray:
    t = np.linspace(0, 1, 64)
    if path == "c":
        a = np.radians(45 + 270 * t)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if path == "s":
        return np.stack([-0.55 * np.sin(2 * np.pi * t), 2 * t - 1], 1)
    if path == "wave":
        return np.stack([2 * t - 1, 0.28 * np.sin(3 * np.pi * t)], 1)
    if path == "spiral":
        a = 2.4 * np.pi * t
        return np.stack([(0.2 + 0.8 * t) * np.cos(a), (0.2 + 0.8 * t) * np.sin(a)], 1)
    if path == "crescent":
        a = np.radians(160 + 220 * t)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if path == "zigzag":
        return _polyline([(-0.6, -1), (0.45, -0.35), (-0.45, 0.35), (0.6, 1)])
    a = np.linspace(np.pi, 0, 20)
    if path == "u":  # straight legs joined by a half circle
        return _polyline([(-0.5, -1)] + [(0.5 * math.cos(x), 0.2 + 0.5 * math.sin(x)) for x in a] + [(0.5, -1)])
    if path == "hook":  # a shaft ending in a curl
        return _polyline([(0.4, -1)] + [(0.4 * math.cos(x), 0.35 + 0.4 * math.sin(x)) for x in a[::-1]])
    raise ValueError(path)


def _worm(path: str, width: float, taper: bool = False, knob: float = 0.0) -> Polys:
    """A thick stroke along a named centre line; ``taper`` thins it to points, ``knob`` adds a head."""
    line = _worm_line(path)
    hw = np.full(len(line), width)
    if taper:
        hw = width * np.sin(np.linspace(0.08, np.pi - 0.08, len(line)))
    out: Polys = [(_band(line, hw), 255)]
    if knob:
        out.append((_ellipse(line[0, 0], line[0, 1], knob, knob), 255))
    return out


# Families only novel kinds use under the ``novel_attributes=own`` knob (no base kind has them).
def _facet(sides: int, hole: float = 0.0) -> Polys:
    """A regular polygon with straight edges, optionally with a round hole."""
    t = np.linspace(0, 2 * np.pi, sides, endpoint=False) - np.pi / 2
    out: Polys = [(np.stack([np.cos(t), np.sin(t)], 1), 255)]
    return out + [(_ellipse(0, 0, hole, hole), 0)] if hole else out


def _plus(arms: int, width: float) -> Polys:
    """``arms`` straight arms of ``width`` from a common centre, with a disc at the hub."""
    out: Polys = [(_ellipse(0, 0, width * 0.9, width * 0.9), 255)]
    for a in np.linspace(0, 2 * np.pi, arms, endpoint=False) - np.pi / 2:
        out.append((_bar((0, 0), (math.cos(a), math.sin(a)), width), 255))
    return out


def _berry(n: int, radius: float) -> Polys:
    """A cluster: ``n`` discs on a ring around a centre disc."""
    ring = 1 - radius
    out: Polys = [(_ellipse(0, 0, radius, radius), 255)]
    for a in np.linspace(0, 2 * np.pi, n, endpoint=False) - np.pi / 2:
        out.append((_ellipse(ring * math.cos(a), ring * math.sin(a), radius, radius), 255))
    return out


_FAMILIES = {
    "flower": _flower,
    "spiky": _spiky,
    "gear": _gear,
    "pebble": _pebble,
    "bug": _bug,
    "leaf": _leaf,
    "leaflets": _leaflets,
    "mushroom": _mushroom,
    "worm": _worm,
    "facet": _facet,
    "plus": _plus,
    "berry": _berry,
}

#: Largest rotation (degrees, either way) of an instance: radial families turn freely; bugs, leaves,
#: worms and (upright) mushrooms keep roughly their orientation, as most real objects do.
MAX_ROTATION = {"flower": 180.0, "spiky": 180.0, "gear": 180.0, "pebble": 180.0,
                "bug": 30.0, "leaf": 40.0, "leaflets": 30.0, "mushroom": 12.0, "worm": 25.0,
                "facet": 180.0, "plus": 180.0, "berry": 180.0}  # fmt: skip


@cache
def unit_silhouette(family: str, args: tuple) -> tuple[tuple[np.ndarray, int], ...]:
    """A kind's canonical polygons: bounding box centred on the origin, longer side 2."""
    polys = _FAMILIES[family](*args)
    pts = np.concatenate([p for p, f in polys if f])
    lo, hi = pts.min(0), pts.max(0)
    centre, scale = (lo + hi) / 2, 2.0 / float((hi - lo).max())
    out = []
    for p, f in polys:
        q = (np.asarray(p, float) - centre) * scale
        q.setflags(write=False)  # cached and shared: never modified in place
        out.append((q, f))
    return tuple(out)


def instance_polys(
    rng: np.random.Generator, family: str, args: tuple, ext: float, aspect: float | None = None
) -> tuple[Polys, float]:
    """One instance's polygons centred at the origin with extent about ``ext``, and its rotation.

    Intra-class variation: aspect 0.85-1.15, rotation within the family's range, and a smooth warp
    (displacement up to 6% of the half-extent) that bends edges without changing the topology.
    ``aspect`` (the kind's characteristic box w/h, ``kind_aspect=coco``): the outline is first
    stretched to that box shape (longer side still ``ext``) and turns at most
    ``ASPECT_MAX_ROTATION`` degrees, so that the box keeps the shape.
    """
    asp = rng.uniform(0.85, 1.15)
    max_rot = MAX_ROTATION[family] if aspect is None else min(MAX_ROTATION[family], ASPECT_MAX_ROTATION)
    ang = rng.uniform(-max_rot, max_rot)
    amp = rng.uniform(0.0, 0.06)
    freq = rng.uniform(1.5, 3.0, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    a = math.radians(ang)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    scale = np.array([asp, 1 / asp]) * ext / 2
    unit = unit_silhouette(family, args)
    if aspect is not None:
        pts = np.concatenate([p for p, f in unit if f])
        half_w, half_h = (pts.max(0) - pts.min(0)) / 2
        scale = scale * np.array([aspect * half_h / half_w, 1.0]) / (half_h * max(aspect, 1.0))
    out = []
    for p, f in unit:
        warp = amp * np.stack([np.sin(freq[0] * p[:, 1] + phase[0]), np.sin(freq[1] * p[:, 0] + phase[1])], 1)
        out.append((((p + warp) * scale) @ rot.T, f))
    return out, ang
