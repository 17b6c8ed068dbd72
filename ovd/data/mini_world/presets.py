"""The scales a mini-world comes in: counts and sizes per preset."""

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


PRESETS: dict[str, MiniPreset] = {
    "smoke": MiniPreset("smoke", web_train_per_class=20, web_val_per_class=5, det_train_images=100, det_val_images=30),
    "bench": MiniPreset(
        "bench", web_train_per_class=400, web_val_per_class=50, det_train_images=1500, det_val_images=400
    ),
}
