"""A second split of an existing v2 world that holds out whole shapes (``ovd data mini-split``)."""

from __future__ import annotations

import os
from pathlib import Path

from ovd.errors import OvdError
from ovd.mini_world.vocabulary import SHAPES, colour_shape_vocabulary
from ovd.utils.io import read_json, write_json


def derive_shape_split(world: str | os.PathLike, shapes: list[str], name: str | None = None) -> dict:
    """A second split of an existing world in which every class of ``shapes`` is novel.

    The default Latin-square split makes each novel class a new combination of a base colour and a
    base shape, so a detector can name novel objects from the text embeddings alone. Holding out a
    whole shape removes that shortcut: no base class shows the shape, and what it looks like can
    only come from CLIP (distillation). Same images; writes ``split_<name>.json`` and
    ``det/train_<name>.json`` (the oracle annotations minus the new novel classes). Idempotent.
    """
    root = Path(world)
    bad = [s for s in shapes if s not in SHAPES]
    if not shapes or bad:
        raise OvdError(f"unknown shape(s) {bad or shapes}; choose from {', '.join(SHAPES)}")
    if len(set(shapes)) >= len(SHAPES):
        raise OvdError("at least one shape must stay base")
    name = name or "heldout_" + "_".join(shapes)
    oracle = read_json(root / "det" / "train_oracle.json", "mini-world oracle annotations")
    if not all("shape" in c for c in oracle.get("categories", [])):
        # v3 kinds have atomic names and no shape attribute: their novel kinds already share no
        # words with base kinds, which is what holding out a shape gives a v2 world
        raise OvdError(
            f"{root} is not a world version 2 (colour x shape classes): held-out shapes exist only there; "
            "generate one with version 2 (world.version=2), or use the v3 world's own split.json"
        )
    vocab = colour_shape_vocabulary()
    novel = [c["name"] for c in vocab if c["shape"] in shapes]
    split = {"base": [c["name"] for c in vocab if c["name"] not in novel], "novel": novel}
    novel_ids = {c["id"] for c in vocab if c["name"] in novel}
    train = {
        **oracle,
        "info": {**oracle["info"], "description": f"{oracle['info']['description']}, split {name}: base classes only"},
        "annotations": [a for a in oracle["annotations"] if a["category_id"] not in novel_ids],
    }
    write_json(root / f"split_{name}.json", split)
    write_json(root / "det" / f"train_{name}.json", train, indent=None)
    return {
        "split": str(root / f"split_{name}.json"),
        "train_json": str(root / "det" / f"train_{name}.json"),
        "base": len(split["base"]),
        "novel": len(novel),
        "train_annotations": len(train["annotations"]),
        "novel_objects_unlabelled": len(oracle["annotations"]) - len(train["annotations"]),
    }
