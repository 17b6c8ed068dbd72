"""World v3 vocabulary: 65 object kinds with atomic invented names in 8 groups, the base/novel split
rule, each kind's silhouette parameters and appearance, and web captions.

Why: in v2 every class is "<colour> <shape>", so a novel name is a sum of base words and a detector
can name novel objects from text embeddings alone. In v3, as in COCO ("umbrella", "cow"), a name is
one atomic word: no two names share a word or even a BPE token of the CLIP tokenizer, and no name
token occurs in any caption word, so what a name looks like can only be learnt from images. Kinds of
one group share a family of silhouettes and a group word in captions ("a kind of flower", as
"animal" in real captions), which gives the text space graded, not compositional, similarity.
"""

from __future__ import annotations

import numpy as np

from ovd.mini_world.knobs import WorldKnobs, kind_aspect

#: Invented names, 2-3 syllables. Chosen once from random consonant-vowel syllables, keeping a name
#: only if the CLIP BPE splits it into 2-3 tokens (whole-word tokens are real words), none of them
#: shared with another name or with a caption word (tests/test_mini_world.py checks this).
NAMES: tuple[str, ...] = (
    "kriskum", "bekfol", "minez", "planol", "pesem", "glotir", "gapuk", "kudaz", "femog",
    "sebdor", "skizip", "furud", "gemtras", "kevirip", "flebrad", "drofflos", "nidral",
    "nosul", "zostal", "tabkis", "tigrotet", "zenelzim", "padrob", "zagrom", "fadrab",
    "magreg", "ladren", "tregur", "spolun", "bolop", "morkotuk", "blazwad", "snasut",
    "kwirlet", "giskam", "brotrib", "vipvid", "stustad", "lelum", "valax", "megpot",
    "rulis", "sofospim", "tosus", "natbon", "disfad", "zisip", "sulox", "limug",
    "vezwaled", "vobaspix", "balur", "rorbrag", "satrag", "logfal", "zugubud", "raspin",
    "tukwilen", "pospet", "rensok", "kistis", "nestol", "sigriz", "fisot", "nugmos",
)  # fmt: skip

# (group word, [(silhouette family, family arguments) per kind]); see silhouettes.py for the families.
# Within a group the parameters differ in count (petals, points, teeth, legs, lobes), thickness,
# elongation and holes, so every kind has its own outline but resembles its group.
_GROUPS: tuple[tuple[str, tuple], ...] = (
    ("flower", (
        ("flower", (3, 0.7, 1.0)), ("flower", (4, 0.5, 0.6)), ("flower", (5, 0.4, 0.5)),
        ("flower", (6, 0.35, 0.5, 0.28)), ("flower", (5, 0.6, 1.0, 0.3)), ("flower", (8, 0.45, 0.6)),
        ("flower", (6, 0.7, 2.0)), ("flower", (7, 0.55, 1.2, 0.22)), ("flower", (2, 0.8, 0.7)),
    )),
    ("urchin", (
        ("spiky", (3, 0.25)), ("spiky", (4, 0.3)), ("spiky", (6, 0.55)), ("spiky", (7, 0.35)),
        ("spiky", (9, 0.55)), ("spiky", (12, 0.6)), ("spiky", (6, 0.35, 0.55)), ("spiky", (8, 0.25, 0.6)),
    )),
    ("gear", (
        ("gear", (6, 0.22, 0.5)), ("gear", (8, 0.18, 0.45, 0.35)), ("gear", (10, 0.2, 0.4)),
        ("gear", (12, 0.12, 0.5, 0.45)), ("gear", (3, 0.4, 0.3, 0.25)), ("gear", (7, 0.2, 0.6, 0.25)),
        ("gear", (16, 0.14, 0.5, 0.5)), ("gear", (4, 0.3, 0.4, 0.3)),
    )),
    ("pebble", (
        ("pebble", (((0, -1), (0.55, -0.7), (0.75, 0), (0.6, 0.65), (0, 0.95), (-0.6, 0.65), (-0.75, 0),
                     (-0.55, -0.7)),)),  # egg
        ("pebble", (((-1, 0), (-0.7, -0.5), (0, -0.65), (0.7, -0.5), (1, 0), (0.7, 0.45), (0.3, 0.45), (0, 0.15),
                     (-0.3, 0.45), (-0.7, 0.45)),)),  # bean
        ("pebble", (((0, -1), (0.5, -0.85), (0.55, -0.45), (0.28, 0), (0.55, 0.45), (0.5, 0.85), (0, 1),
                     (-0.5, 0.85), (-0.55, 0.45), (-0.28, 0), (-0.55, -0.45), (-0.5, -0.85)),)),  # peanut
        ("pebble", (((0, -1), (0.3, -0.85), (0.3, -0.4), (0.7, 0.1), (0.75, 0.6), (0.4, 0.95), (-0.4, 0.95),
                     (-0.75, 0.6), (-0.7, 0.1), (-0.3, -0.4), (-0.3, -0.85)),)),  # pear
        ("pebble", (((0, -0.45), (0.4, -0.95), (0.95, -0.6), (0.8, 0.1), (0, 0.95), (-0.8, 0.1), (-0.95, -0.6),
                     (-0.4, -0.95)),)),  # heart
        ("pebble", (((-0.6, -1), (0.1, -1), (0.1, 0.2), (0.9, 0.3), (0.9, 1), (-0.6, 1)),)),  # boot
        ("pebble", (((-1, -0.45), (1, -0.45), (1, 0.45), (-1, 0.45)),)),  # pill
        ("pebble", (((-1, -0.6), (-0.5, 0.1), (0.2, 0.35), (1, 0.1), (0.95, 0.45), (0.2, 0.8), (-0.6, 0.5)),)),
    )),
    ("bug", (
        ("bug", (3, (0.4, 0.6), 0.2, True)), ("bug", (4, (0.35, 0.4), 0.12, False)),
        ("bug", (3, (0.55, 0.6), 0.18, False)), ("bug", (0, (0.2, 0.5), 0.15, False, True)),
        ("bug", (3, (0.25, 0.7), 0.17, True, False, 3)), ("bug", (2, (0.12, 0.9), 0.1, True)),
        ("bug", (2, (0.6, 0.3), 0.0, False, True)), ("bug", (4, (0.45, 0.5), 0.1, True, False, 2)),
    )),
    ("leaf", (
        ("leaf", (0.2, 1.0)), ("leaf", (0.55, 0.8)), ("leaf", (0.55, 0.7, 0, 0.0, 0.35, 0.55)),
        ("leaf", (0.4, 0.9, 8, 0.25)), ("leaf", (0.5, 0.8, 3, 0.45)), ("leaflets", (3, 0.55, 1.2, 0.5)),
        ("leaflets", (5, 0.35, 1.4, 0.35)), ("leaf", (0.38, 1.0, 7, 0.7, 0.15)),
    )),
    ("mushroom", (
        ("mushroom", ("dome", 0.9, 0.5, 0.25, 0.6)), ("mushroom", ("cone", 0.55, 0.7, 0.14, 0.6)),
        ("mushroom", ("dome", 1.0, 0.2, 0.18, 0.7)), ("mushroom", ("ball", 0.42, 0.42, 0.1, 0.7)),
        ("mushroom", ("pine", 0.7, 0.7, 0.18, 0.35)), ("mushroom", ("bell", 0.7, 0.6, 0.4, 0.3)),
        ("mushroom", ("tiers", 0.8, 0.4, 0.2, 0.45)), ("mushroom", ("cloud", 0.55, 0.5, 0.16, 0.6)),
    )),
    ("worm", (
        ("worm", ("c", 0.22)), ("worm", ("s", 0.2)), ("worm", ("u", 0.22)), ("worm", ("zigzag", 0.16)),
        ("worm", ("spiral", 0.15)), ("worm", ("wave", 0.17)), ("worm", ("crescent", 0.38, True)),
        ("worm", ("hook", 0.16, False, 0.3)),
    )),
)  # fmt: skip

GROUPS: tuple[str, ...] = tuple(g for g, _ in _GROUPS)

#: Kind colours (sRGB) and the colour words captions use for them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (235, 210, 30),
    "lime": (150, 210, 40),
    "green": (35, 150, 60),
    "teal": (20, 160, 150),
    "blue": (40, 90, 220),
    "purple": (140, 60, 200),
    "pink": (235, 100, 170),
    "brown": (140, 85, 45),
}
#: Fill patterns (the caption word for each): the second colour draws the stripes, spots, ...
PATTERNS: tuple[str, ...] = ("plain", "striped", "spotted", "checkered", "ringed")
SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")

# ``novel_attributes=own``: colours, patterns and silhouette families (with their group words) that
# only novel kinds have. Novel kind n (in vocabulary order) takes family n mod 3 with variant n // 3,
# so every novel kind keeps its own outline.
OWN_PALETTE: dict[str, tuple[int, int, int]] = {
    "navy": (25, 35, 110),
    "olive": (120, 120, 30),
    "maroon": (120, 20, 50),
    "cyan": (70, 215, 235),
    "lavender": (185, 160, 240),
}
OWN_PATTERNS: tuple[str, ...] = ("zigzag", "hatched")
_OWN_GROUPS: tuple[tuple[str, str, tuple], ...] = (
    ("crystal", "facet", ((3, 0.0), (4, 0.35), (5, 0.0), (6, 0.4), (7, 0.0), (8, 0.3))),
    ("badge", "plus", ((3, 0.35), (4, 0.3), (5, 0.25), (6, 0.22), (4, 0.5), (8, 0.2))),
    ("berry", "berry", ((3, 0.5), (4, 0.45), (5, 0.4), (6, 0.35), (7, 0.3), (2, 0.55))),
)


def _is_novel(g: int, j: int) -> bool:
    """Kind j of group g is novel iff (j + g) mod 4 == 0: one in four, staggered over the groups."""
    return (j + g) % 4 == 0


def kinds_vocabulary(knobs: WorldKnobs | None = None) -> list[dict]:
    """All 65 kinds in fixed order (ids 1..65, group-major), with group, appearance and silhouette.

    ``knobs`` (default: none changed) may give novel kinds their own attributes and every kind a
    characteristic box aspect (``"aspect"``, only then present); see knobs.py.
    """
    knobs = knobs or WorldKnobs()
    colours = list(PALETTE)
    vocab, k = [], 0
    for g, (group, members) in enumerate(_GROUPS):
        for j, (family, args) in enumerate(members):
            c = (3 * g + 7 * j) % len(colours)  # 7 is prime to 10: every kind of a group has its own colour
            vocab.append(
                {
                    "id": k + 1,
                    "name": NAMES[k],
                    "group": group,
                    "colour": colours[c],
                    "colour2": colours[(c + 5) % len(colours)],
                    "pattern": PATTERNS[(j + 2 * g) % len(PATTERNS)],
                    "silhouette": [family, _jsonable(args)],
                }
            )
            k += 1
    if knobs.novel_attributes == "own":
        _own_novel_attributes(vocab)
    if knobs.kind_aspect == "coco":
        for c in vocab:
            c["aspect"] = kind_aspect(c["id"])
    return vocab


def _own_novel_attributes(vocab: list[dict]) -> None:
    """In place: novel kinds take colours, patterns, silhouettes and group words no base kind has."""
    novel = set(kinds_split()["novel"])
    own = list(OWN_PALETTE)
    for n, c in enumerate(c for c in vocab if c["name"] in novel):
        group, family, variants = _OWN_GROUPS[n % len(_OWN_GROUPS)]
        c.update(
            group=group,
            colour=own[n % len(own)],
            colour2=own[(n + 2) % len(own)],
            pattern=OWN_PATTERNS[n % len(OWN_PATTERNS)],
            silhouette=[family, _jsonable(variants[n // len(_OWN_GROUPS)])],
        )


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def kind_silhouette(cls: dict) -> tuple[str, tuple]:
    """(family, hashable arguments) of a kind record, for silhouettes.unit_silhouette."""
    family, args = cls["silhouette"]

    def tup(x):
        return tuple(tup(v) for v in x) if isinstance(x, list) else x

    return family, tup(args)


def kinds_split() -> dict:
    """``{"base": [48 names], "novel": [17 names]}`` in vocabulary order."""
    base, novel = [], []
    k = 0
    for g, (_, members) in enumerate(_GROUPS):
        for j in range(len(members)):
            (novel if _is_novel(g, j) else base).append(NAMES[k])
            k += 1
    return {"base": base, "novel": novel}


def kinds_categories(knobs: WorldKnobs | None = None) -> list[dict]:
    """COCO categories: the group word is the supercategory (as "animal" is for "cow")."""
    return [
        {"id": c["id"], "name": c["name"], "supercategory": c["group"], "colour": c["colour"], "pattern": c["pattern"]}
        for c in kinds_vocabulary(knobs)
    ]


# at most 14 tokens with the longest words, so that no caption is cut by the tiny CLIP's context of 16
_CAPTION_TEMPLATES = (
    "a photo of {a_name} {name}.",
    "a photo of {a_colour} {colour} {name}.",
    "{a_size} {size} {pattern} {name}.",
    "{a_name} {name}, a kind of {group}.",
    "a close-up photo of {a_pattern} {pattern} {name}.",
    "{a_colour} {colour} {name} on a light background.",
    "{a_colour} {colour} {pattern} {group} called {a_name} {name}.",
    "an image of {a_size} {size} {colour} {name}.",
)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def kind_caption(rng: np.random.Generator, cls: dict, size_frac: float) -> str:
    """A web caption: the name with context words (colour, pattern, size, group word)."""
    size = SIZE_WORDS[int(np.searchsorted([0.62, 0.74], size_frac))]
    t = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    words = {"name": cls["name"], "colour": cls["colour"], "pattern": cls["pattern"], "size": size}
    return t.format(group=cls["group"], **words, **{f"a_{k}": article(v) for k, v in words.items()})
