"""Detection-domain scenes (COCO's stand-in): clutter, several small class objects (v2 shapes or v3
kinds) placed under an occlusion budget, thin distractors in front, then a per-image camera/domain
shift."""

from __future__ import annotations

import math

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageFilter

from ovd.mini_world.draw import (
    MAX_ROT,
    alpha_slices,
    apply_matrix,
    box_from_alpha,
    composite,
    hue_matrix,
    poly_extent,
    polys_alpha,
    shape_polys,
    to_uint8,
)
from ovd.mini_world.kinds import kind_silhouette
from ovd.mini_world.patterns import kind_field
from ovd.mini_world.presets import MiniPreset
from ovd.mini_world.silhouettes import instance_polys
from ovd.mini_world.textures import (
    CLUTTER_KINDS,
    FRONT_KINDS,
    clutter_alpha,
    clutter_colour,
    det_background,
    object_fill,
)
from ovd.mini_world.versions import GENERATOR_VERSION, mini_vocabulary
from ovd.mini_world.vocabulary import COLOURS

_MAX_OCCLUDED = 0.15  # at most this fraction of an annotated object's pixels may be covered
_MAX_BOX_COVERED = 0.3  # ... and at most this fraction of its box
_PLACE_ATTEMPTS = 40  # tries at placing one object before it is dropped
_SHRINK_EVERY = 8  # ... shrinking it by 15% after every this many failed tries


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


def render_det(
    rng: np.random.Generator,
    cat_ids: list[int],
    p: MiniPreset,
    extents: list | None = None,
    version: int = GENERATOR_VERSION,
    vocab: list[dict] | None = None,
):
    """One detection scene. Returns (uint8 image, [(category_id, [x, y, w, h], segmentation)],
    n_dropped); the segmentation is the object's visible silhouette as a compressed RLE, the pixels
    whose box ``[x, y, w, h]`` is.

    If ``extents`` is a list, the polygon extent (x0, y0, x1, y1) of each returned object is
    appended to it (for tests of box tightness). ``vocab``: the class records (default: the
    version's; a world with changed knobs passes its own).
    """
    # the steps draw from ``rng`` in this fixed order: reordering them changes every scene
    size = p.det_size
    img = det_background(rng, size, size)
    _draw_back_clutter(rng, img, p)
    placed, dropped = _place_objects(rng, img, cat_ids, p, version, vocab)
    _draw_front_clutter(rng, img, placed)
    objects, empty = _visible_boxes(placed, extents)
    return camera(rng, img), objects, dropped + empty


def _fits(placed: list[_Placed], alpha: np.ndarray) -> bool:
    """Would every placed object stay clearly visible under ``alpha``?"""
    return all(o.fits_under(alpha) for o in placed)


def _draw_back_clutter(rng: np.random.Generator, img: np.ndarray, p: MiniPreset) -> None:
    """In place: unannotated distractors behind the objects (they may be hidden freely)."""
    h = w = p.det_size
    n_back = int(rng.integers(p.det_clutter[0], p.det_clutter[1] + 1))
    for _ in range(n_back):
        kind = CLUTTER_KINDS[int(rng.integers(len(CLUTTER_KINDS)))]
        composite(img, clutter_alpha(rng, kind, h, w), clutter_colour(rng, kind))


def _place_objects(
    rng: np.random.Generator,
    img: np.ndarray,
    cat_ids: list[int],
    p: MiniPreset,
    version: int,
    vocab: list[dict] | None = None,
) -> tuple[list[_Placed], int]:
    """In place: draw the class objects in order, each where it hides too little of those before it.

    Returns the placed objects and how many could not be placed.
    """
    vocab = {c["id"]: c for c in (vocab or mini_vocabulary(version))}
    placed: list[_Placed] = []
    dropped = 0
    for cid in cat_ids:
        cls = vocab[cid]
        pose = _find_pose(rng, _pose_fn(cls, version), placed, p)
        if pose is None:
            dropped += 1
            continue
        alpha, polys, cx, cy, ext, ang = pose
        for o in placed:
            o.cover(alpha)
        placed.append(_Placed(cid, alpha, poly_extent(polys)))
        sl = alpha_slices(alpha)
        if version == 2:
            field = object_fill(rng, COLOURS[cls["colour"]], cx, cy, ext, sl)
        else:
            field = kind_field(rng, cls, sl, cx, cy, ext, ang, det=True)
        composite(img, alpha, field, sl)
    return placed, dropped


def _pose_fn(cls: dict, version: int):
    """``f(rng, ext) -> (polygons centred on the origin, rotation)``: one try at an object's shape."""
    if version == 2:
        shape = cls["shape"]

        def v2(rng: np.random.Generator, ext: float):
            asp = rng.uniform(0.9, 1.1)
            ang = rng.uniform(-MAX_ROT[shape], MAX_ROT[shape])
            return shape_polys(shape, 0.0, 0.0, ext * asp, ext / asp, ang), ang

        return v2
    family, args = kind_silhouette(cls)
    return lambda rng, ext: instance_polys(rng, family, args, ext, cls.get("aspect"))


def _find_pose(rng: np.random.Generator, pose_fn, placed: list[_Placed], p: MiniPreset):
    """Size, shape, rotation and position of one object that keeps every placed object visible.

    Returns (alpha, polygons, cx, cy, extent, rotation), or None when no try fits.
    """
    h = w = p.det_size
    lo, hi = math.log(p.det_object_px[0]), math.log(p.det_object_px[1])
    ext = math.exp(rng.uniform(lo, hi))
    for attempt in range(_PLACE_ATTEMPTS):
        if attempt and attempt % _SHRINK_EVERY == 0:
            ext = max(p.det_object_px[0], ext * 0.85)
        polys, ang = pose_fn(rng, ext)
        x0, y0, x1, y1 = poly_extent(polys)
        cx = rng.uniform(1 - x0, w - 1 - x1)
        cy = rng.uniform(1 - y0, h - 1 - y1)
        polys = [(q + [cx, cy], f) for q, f in polys]
        alpha = polys_alpha(polys, w, h)
        if _fits(placed, alpha):
            return alpha, polys, cx, cy, ext, ang
    return None


def _draw_front_clutter(rng: np.random.Generator, img: np.ndarray, placed: list[_Placed]) -> None:
    """In place: a few thin distractors in front, never hiding more than allowed of any object."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(0, 3))):
        kind = FRONT_KINDS[int(rng.integers(len(FRONT_KINDS)))]
        alpha = clutter_alpha(rng, kind, h, w)
        colour = clutter_colour(rng, kind)
        if _fits(placed, alpha):
            for o in placed:
                o.cover(alpha)
            composite(img, alpha, colour)


def _visible_boxes(placed: list[_Placed], extents: list | None) -> tuple[list[tuple[int, list[float], dict]], int]:
    """``[(category_id, box of the visible part, its RLE)]`` and the number of objects left with no box.

    The visible part is where the object's own alpha, after everything drawn over it, is >= 0.5: its
    exact pixels as pycocotools' compressed RLE (no polygon tracing, which would move the boundary by
    up to a pixel and could leave the box), so the mask's box is the annotated box."""
    objects = []
    empty = 0
    for o in placed:
        visible = o.alpha * o.free
        box = box_from_alpha(visible)
        if box is None:  # cannot happen with >= 85% visible, but never emit an empty box
            empty += 1
            continue
        rle = mask_utils.encode(np.asfortranarray(visible >= 0.5, dtype=np.uint8))
        objects.append((o.cid, box, {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}))
        if extents is not None:
            extents.append(o.extent)
    return objects, empty


def camera(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Per-image lighting and colour shift, then blur and sensor noise (the domain shift from web)."""
    h, w = img.shape[:2]
    img = img * (1 + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)  # colour cast
    img = apply_matrix(img, hue_matrix(rng.uniform(-10, 10)))
    img = img * rng.uniform(0.8, 1.15)
    mean = float(img.mean())
    img = (img - mean) * rng.uniform(0.75, 1.1) + mean
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.2)
    pil = Image.fromarray(to_uint8(img), "RGB").filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    out = np.asarray(pil, np.float32) + rng.normal(0, rng.uniform(2, 8), (h, w, 3))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
