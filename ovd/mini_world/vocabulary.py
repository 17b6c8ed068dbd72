"""World v2 vocabulary: the 36 classes ``"<colour> <shape>"``, the fixed base/novel split, and web captions."""

from __future__ import annotations

import numpy as np

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


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _is_novel(ci: int, si: int) -> bool:
    d = (si - ci) % len(SHAPES)
    return d == _NOVEL_OFFSET_ALL or (d == _NOVEL_OFFSET_EVEN and ci % 2 == 0)


def colour_shape_vocabulary() -> list[dict]:
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


def colour_shape_split() -> dict:
    """``{"base": [27 names], "novel": [9 names]}`` in vocabulary order."""
    base, novel = [], []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            (novel if _is_novel(ci, si) else base).append(f"{colour} {shape}")
    return {"base": base, "novel": novel}


def colour_shape_categories() -> list[dict]:
    return [
        {
            "id": c["id"],
            "name": c["name"],
            "supercategory": c["shape"],
            "colour": c["colour"],
            "shape": c["shape"],
        }
        for c in colour_shape_vocabulary()
    ]


def web_caption(rng: np.random.Generator, cls: dict) -> str:
    t = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    cap = t.format(
        name=cls["name"],
        colour=cls["colour"],
        shape=cls["shape"],
        a_name=article(cls["name"]),
        a_colour=article(cls["colour"]),
        a_shape=article(cls["shape"]),
    )
    return cap[0].lower() + cap[1:]
