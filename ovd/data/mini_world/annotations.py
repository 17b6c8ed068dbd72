"""The annotation files derived from the rendered scenes: COCO train (base only) / oracle / val, the
LVIS copy of val, and TFA-style K-shot novel splits."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pycocotools.mask as mask_utils

from ovd.errors import OvdError

_FEWSHOT_TRIES = 200  # random image orders tried per novel class before giving up
# Version of what the annotation files say about the (unchanged) images. 1: each object's
# segmentation was its box's rectangle; 2: its visible silhouette (compressed RLE) and ``area``
# that silhouette's pixel count, as in COCO. Recorded in world.json and each det file's ``info``.
ANNOTATION_VERSION = 2


def _det_files(
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


def fewshot_subset(oracle: dict, novel_ids: list[int], k: int, s: int) -> dict:
    """TFA-style: for each novel class pick images until exactly k instances of it are annotated."""
    rng = np.random.default_rng(s)
    per_cls_img: dict[int, Counter] = defaultdict(Counter)
    by_img_cls: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for a in oracle["annotations"]:
        per_cls_img[a["category_id"]][a["image_id"]] += 1
        by_img_cls[(a["image_id"], a["category_id"])].append(a)
    names = {c["id"]: c["name"] for c in oracle["categories"]}
    chosen_anns: list[dict] = []
    chosen_imgs: set[int] = set()
    for cid in novel_ids:  # one generator for all classes, in this order: the picks depend on it
        picked = _pick_exactly_k(rng, per_cls_img[cid], k)
        if picked is None:
            raise OvdError(
                f"mini-world too small for {k}-shot: cannot pick exactly {k} instances of "
                f"'{names[cid]}' from {sum(per_cls_img[cid].values())} in det/train"
            )
        for im in picked:
            chosen_imgs.add(im)
            chosen_anns.extend(by_img_cls[(im, cid)])
    images = [im for im in oracle["images"] if im["id"] in chosen_imgs]
    anns = sorted(chosen_anns, key=lambda a: a["id"])
    return {
        "info": {**oracle["info"], "description": f"mini-world {k}-shot novel split, sampling seed {s}"},
        "images": images,
        "annotations": anns,
        "categories": oracle["categories"],
    }


def _pick_exactly_k(rng: np.random.Generator, per_img: Counter, k: int) -> list[int] | None:
    """Image ids holding exactly ``k`` instances in all (``per_img``: instances per image), or None.

    Greedy over random image orders, skipping images that would overshoot.
    """
    img_ids = sorted(per_img)
    for _ in range(_FEWSHOT_TRIES):
        order = rng.permutation(len(img_ids))
        sel, n = [], 0
        for j in order:
            im = img_ids[int(j)]
            m = per_img[im]
            if n + m > k:
                continue
            sel.append(im)
            n += m
            if n == k:
                break
        if n == k:
            return sel
    return None


def _lvis_val(val: dict, train: dict) -> dict:
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
