"""World versions: which vocabulary, split, categories and presets a world of version 2 or 3 uses.

v3 (the default) has 65 kinds with atomic invented names (kinds.py); v2 has 36 "<colour> <shape>"
classes (vocabulary.py) and stays selectable, byte for byte as before, so that numbers measured on
it can be reproduced.
"""

from __future__ import annotations

from typing import Any

from ovd.errors import OvdError
from ovd.mini_world.kinds import kinds_categories, kinds_split, kinds_vocabulary
from ovd.mini_world.knobs import WorldKnobs
from ovd.mini_world.presets import PRESETS_V2, PRESETS_V3, MiniPreset
from ovd.mini_world.vocabulary import colour_shape_categories, colour_shape_split, colour_shape_vocabulary

#: The newest world version: what a world is generated as unless another is asked for.
GENERATOR_VERSION = 3
SUPPORTED_VERSIONS = (2, 3)


def check_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        raise OvdError(
            f"unknown mini-world version {version!r}; expected one of: {', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    return version


def mini_vocabulary(version: int = GENERATOR_VERSION, knobs: WorldKnobs | None = None) -> list[dict]:
    """The class records of a world version (and world knobs), in id order (ids 1..n)."""
    return colour_shape_vocabulary() if check_version(version) == 2 else kinds_vocabulary(knobs)


def mini_split(version: int = GENERATOR_VERSION) -> dict:
    """``{"base": [names], "novel": [names]}`` of a world version, in vocabulary order."""
    return colour_shape_split() if check_version(version) == 2 else kinds_split()


def coco_categories(version: int, knobs: WorldKnobs | None = None) -> list[dict]:
    """The ``categories`` list every annotation file of a world version carries."""
    return colour_shape_categories() if check_version(version) == 2 else kinds_categories(knobs)


def presets(version: int) -> dict[str, MiniPreset]:
    return PRESETS_V2 if check_version(version) == 2 else PRESETS_V3
