"""The annotation files derived from the rendered scenes: COCO train (base only) / oracle / val, the
LVIS copy of val (the K-shot novel splits: ovd.data.fewshot)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pycocotools.mask as mask_utils

# Version of what the annotation files say about the (unchanged) images. 1: each object's
# segmentation was its box's rectangle; 2: its visible silhouette (compressed RLE) and ``area``
# that silhouette's pixel count, as in COCO. Recorded in world.json and each det file's ``info``.
ANNOTATION_VERSION = 2


def det_annotation_files(
    det_meta: dict[str, list[dict]], det_results: list, preset: str, seed: int, categories: list[dict], novel_ids
) -> tuple[dict[str, dict], int]:
    """COCO dicts ``train`` (base classes only), ``train_oracle`` and ``val``, and the dropped-object count.

    ``det_results`` holds ``(objects, n_dropped)`` per scene, train scenes then val, as ``det_meta``.
    """
    novel_set = set(novel_ids)
    results = iter(det_results)
    dropped = 0
    det_files: dict[str, dict] = {}
    for sp in ("train", "val"):
        anns = []
        for rec in det_meta[sp]:
            objects, n_drop = next(results)
            dropped += n_drop
            for cid, box, rle in objects:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": rec["id"],
                        "category_id": cid,
                        "bbox": box,
                        "area": float(mask_utils.area(rle)),
                        "iscrowd": 0,
                        "segmentation": rle,
                    }
                )
        info = {
            "description": f"mini-world det {sp} (preset {preset}, seed {seed})",
            "annotation_version": ANNOTATION_VERSION,
        }
        full = {"info": info, "images": det_meta[sp], "annotations": anns, "categories": categories}
        if sp == "train":
            det_files["train_oracle"] = full
            base_anns = [a for a in anns if a["category_id"] not in novel_set]
            det_files["train"] = {
                **full,
                "info": {**info, "description": info["description"] + ", base classes only"},
                "annotations": base_anns,
            }
        else:
            det_files["val"] = full
    return det_files, dropped


def lvis_val(val: dict, train: dict) -> dict:
    """det/val in LVIS format; category frequencies come from ``train`` (the base-only file)."""
    present: dict[int, set] = defaultdict(set)
    for a in val["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    all_ids = [c["id"] for c in val["categories"]]
    images = []
    for im in val["images"]:
        images.append(
            {
                **im,
                "neg_category_ids": [i for i in all_ids if i not in present[im["id"]]],
                "not_exhaustive_category_ids": [],
            }
        )
    anns = [{k: v for k, v in a.items() if k != "iscrowd"} for a in val["annotations"]]
    return {
        "info": {**val["info"], "description": "mini-world det val in LVIS format (frequency from det/train.json)"},
        "images": images,
        "annotations": anns,
        "categories": _lvis_categories(val["categories"], train),
    }


def _lvis_categories(categories: list[dict], train: dict) -> list[dict]:
    """LVIS category records with image/instance counts and r/c/f frequency from ``train``."""
    img_count: Counter = Counter()
    inst_count: Counter = Counter()
    seen = set()
    for a in train["annotations"]:
        inst_count[a["category_id"]] += 1
        if (a["image_id"], a["category_id"]) not in seen:
            seen.add((a["image_id"], a["category_id"]))
            img_count[a["category_id"]] += 1
    cats = []
    for c in categories:
        n = img_count[c["id"]]
        freq = "r" if n <= 10 else ("c" if n <= 100 else "f")
        cats.append(
            {
                "id": c["id"],
                "name": c["name"],
                "synset": "mini." + c["name"].replace(" ", "_"),
                "synonyms": [c["name"]],
                "def": _definition(c),
                "frequency": freq,
                "image_count": n,
                "instance_count": inst_count[c["id"]],
                **{k: v for k, v in c.items() if k not in ("id", "name")},  # supercategory and attributes
            }
        )
    return cats


def _definition(c: dict) -> str:
    """LVIS ``def``: v2 "a star coloured red"; v3 "a kind of flower, red and striped"."""
    if "shape" in c:
        return f"a {c['shape']} coloured {c['colour']}"
    return f"a kind of {c['supercategory']}, {c['colour']} and {c['pattern']}"
