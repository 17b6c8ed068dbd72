"""The scales a mini-world comes in: counts and sizes per preset, for each world version."""

from __future__ import annotations

from dataclasses import dataclass


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


#: World v2 (36 colour x shape classes): the counts its numbers in docs/ were measured with.
PRESETS_V2: dict[str, MiniPreset] = {
    "smoke": MiniPreset("smoke", web_train_per_class=20, web_val_per_class=5, det_train_images=100, det_val_images=30),
    "bench": MiniPreset(
        "bench", web_train_per_class=400, web_val_per_class=50, det_train_images=1500, det_val_images=400
    ),
}

#: World v3 (65 kinds). Smoke: 160 train scenes (~880 objects, 13-14 per kind) so that every novel
#: kind has enough instances for an exact 10-shot split and no base kind falls to LVIS "rare"
#: (<= 10 images); 40 val scenes so that each kind has a few val objects. Bench: 250 web images per
#: kind keep the web domain about as big as v2's (16,250 vs 14,400 class images), and so the
#: generation time.
PRESETS_V3: dict[str, MiniPreset] = {
    "smoke": MiniPreset("smoke", web_train_per_class=20, web_val_per_class=5, det_train_images=160, det_val_images=40),
    "bench": MiniPreset(
        "bench", web_train_per_class=250, web_val_per_class=30, det_train_images=1500, det_val_images=400
    ),
    # The world sweep (tools/run_world_sweep.py): 15 worlds x 3 detectors, so about 40% of bench's
    # images per world and the machine time goes to world seeds; smoke's 40 val scenes are too few
    # to rank detectors (its novel AP50 is about 0 for every variant).
    "sweep": MiniPreset(
        "sweep", web_train_per_class=120, web_val_per_class=20, det_train_images=600, det_val_images=200
    ),
}

#: The presets of the default world version.
PRESETS = PRESETS_V3
