"""World knobs: properties of a v3 world that decide how much a text classifier alone can do and how
well the tiny CLIP teacher names detection crops — the instrument for asking *when* distillation
helps. Every default reproduces the world v3 as it was before the knobs, byte for byte; a world made
with other values records them in ``world.json`` under ``"knobs"`` (a default world has no such
entry, so its files are unchanged).

* ``novel_attributes``: ``shared`` (novel kinds reuse the base kinds' colours, patterns and
  silhouette families, and captions spell those out) or ``own`` (novel kinds get colours, patterns,
  silhouette families and a group word that no base kind has, so the text embedding of a novel name
  cannot be predicted from base regions).
* ``kind_aspect``: ``square`` (every instance near the kind's natural outline, aspect 0.85-1.15) or
  ``coco`` (each kind has a characteristic box aspect w/h drawn log-uniformly from 1:3 to 3:1, as
  COCO's boxes spread, and instances keep it: rotation at most 10 degrees).
* ``web_per_class``: web images per kind in the train split (0: the preset's): more teacher data.
* ``web_style``: ``clean`` (one large centred object on a clean background) or ``scene`` (web
  images that look like detection crops: cluttered textured background, shaded fill, the camera
  shift, smaller off-centre objects): a teacher pre-trained closer to the detection domain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ovd.errors import OvdError

NOVEL_ATTRIBUTES = ("shared", "own")
KIND_ASPECTS = ("square", "coco")
WEB_STYLES = ("clean", "scene")

#: Log-uniform range of a kind's box aspect (w/h) under ``kind_aspect=coco``: COCO's boxes mostly
#: lie between 1:3 and 3:1.
ASPECT_RANGE = (1 / 3, 3.0)
#: Rotation limit (degrees, either way) under ``kind_aspect=coco``: a turned elongated object would
#: lose its characteristic box shape.
ASPECT_MAX_ROTATION = 10.0


@dataclass(frozen=True)
class WorldKnobs:
    novel_attributes: str = "shared"
    kind_aspect: str = "square"
    web_per_class: int = 0
    web_style: str = "clean"

    def changed(self) -> dict[str, Any]:
        """The knobs that differ from their defaults (what ``world.json`` records)."""
        default = WorldKnobs()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}


def check_knobs(knobs: Any, version: int) -> WorldKnobs:
    """A valid :class:`WorldKnobs` from a WorldKnobs, a dict of knob values, or None (defaults)."""
    if knobs is None:
        return WorldKnobs()
    if isinstance(knobs, dict):
        unknown = sorted(set(knobs) - {f.name for f in fields(WorldKnobs)})
        if unknown:
            raise OvdError(f"unknown mini-world knob(s) {', '.join(unknown)}")
        knobs = WorldKnobs(**knobs)
    if not isinstance(knobs, WorldKnobs):
        raise OvdError(f"mini-world knobs must be a dict of knob values, got {type(knobs).__name__}")
    for name, allowed in (
        ("novel_attributes", NOVEL_ATTRIBUTES),
        ("kind_aspect", KIND_ASPECTS),
        ("web_style", WEB_STYLES),
    ):
        if getattr(knobs, name) not in allowed:
            raise OvdError(f"world.{name}: expected one of {', '.join(allowed)}, got {getattr(knobs, name)!r}")
    n = knobs.web_per_class
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise OvdError(f"world.web_per_class: expected a non-negative integer (0: the preset's), got {n!r}")
    if version != 3 and knobs.changed():
        raise OvdError(f"world knobs {', '.join(knobs.changed())} exist for world version 3 only, not {version}")
    return knobs


def kind_aspect(kind_id: int) -> float:
    """Kind ``kind_id``'s characteristic box aspect (w/h) under ``kind_aspect=coco``.

    A property of the kind, like its colour: the same in every world seed, drawn once from its own
    generator so that adding kinds never changes the others'.
    """
    u = np.random.default_rng([7, int(kind_id)]).uniform()
    lo, hi = (math.log(a) for a in ASPECT_RANGE)
    return round(math.exp(lo + u * (hi - lo)), 4)


#: The knob names (each is also a ``world.*`` config key).
WORLD_KNOBS: tuple[str, ...] = tuple(f.name for f in fields(WorldKnobs))
