"""The mini-world: a procedurally generated, seed-deterministic stand-in for CLIP's web data and COCO.

Two world versions. **v3** (the default): 65 object kinds with atomic invented names ("kriskum"),
in 8 groups of similar silhouettes ("a kind of flower"), 48 base / 17 novel like COCO's split.
**v2**: 36 compositional classes ``"<colour> <shape>"``, kept byte-identical so that numbers
measured on it can be reproduced (``generate_mini_world(..., version=2)``). Two domains:

* **web** (stands for CLIP's web pre-training photos): 64x64 object-centric images, one large
  near-centred object on a clean light background, plus a caption per image.
* **det** (stands for COCO): 160x160 cluttered scenes with several small objects, textured
  backgrounds, shaded/textured object fills, per-image lighting/colour shifts, blur and noise.
  ``train.json`` annotates base classes only (novel objects are in the pixels, unlabelled);
  ``val.json`` annotates everything; an LVIS-format copy of val and TFA-style K-shot novel splits
  are written too.

Every image is rendered from its own ``numpy.random.Generator`` seeded with
``(seed, domain, split, index)``, so the output never depends on worker scheduling: the same preset,
seed and version give byte-identical JSON and pixel-identical PNGs. See ``docs/mini_world.md``.

Modules, one concept each (imports only go downwards in this list, so there are no cycles):
``vocabulary`` (v2 classes, split rule, captions), ``kinds`` (v3 kinds, groups, split rule,
captions), ``presets``, ``versions`` (what each version uses), ``draw`` (raster primitives),
``silhouettes`` (v3 contours and their variation), ``patterns`` (v3 appearance), ``textures``
(backgrounds, v2 fills, clutter), ``web`` and ``scene`` (the two domains' images), ``tasks``
(per-image seeding and the worker pool), ``annotations`` (COCO/LVIS/few-shot files), ``generate``
(building a world), ``shape_split`` (held-out-shape splits of a built v2 world).
"""

from __future__ import annotations

from ovd.mini_world.generate import generate_mini_world
from ovd.mini_world.kinds import GROUPS, NAMES
from ovd.mini_world.presets import PRESETS, PRESETS_V2, PRESETS_V3, MiniPreset
from ovd.mini_world.shape_split import derive_shape_split
from ovd.mini_world.versions import GENERATOR_VERSION, SUPPORTED_VERSIONS, mini_split, mini_vocabulary
from ovd.mini_world.vocabulary import COLOURS, SHAPES

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "GROUPS",
    "NAMES",
    "PRESETS",
    "PRESETS_V2",
    "PRESETS_V3",
    "SHAPES",
    "SUPPORTED_VERSIONS",
    "MiniPreset",
    "derive_shape_split",
    "generate_mini_world",
    "mini_split",
    "mini_vocabulary",
]
