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

Modules, one concept each (imports only go downwards in this list, so there are no cycles):
``vocabulary`` (classes, split rule, captions), ``presets``, ``draw`` (raster primitives),
``textures`` (backgrounds, fills, clutter), ``web`` and ``scene`` (the two domains' images),
``tasks`` (per-image seeding and the worker pool), ``annotations`` (COCO/LVIS/few-shot files),
``generate`` (building a world), ``shape_split`` (held-out-shape splits of a built world).
"""

from __future__ import annotations

from ovd.data.mini_world.generate import GENERATOR_VERSION, generate_mini_world
from ovd.data.mini_world.presets import PRESETS, MiniPreset
from ovd.data.mini_world.shape_split import derive_shape_split
from ovd.data.mini_world.vocabulary import COLOURS, SHAPES, mini_split, mini_vocabulary

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "PRESETS",
    "SHAPES",
    "MiniPreset",
    "derive_shape_split",
    "generate_mini_world",
    "mini_split",
    "mini_vocabulary",
]
