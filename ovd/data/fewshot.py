"""K-shot subsets of a COCO annotation dict (TFA's rule): the few-shot files of the mini-world and
the K-shot base boxes of a few-shot fine-tune (``ovd fewshot --mode base``)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from ovd.errors import OvdError

_FEWSHOT_TRIES = 200  # random image orders tried per class before giving up


def fewshot_subset(oracle: dict, novel_ids: list[int], k: int, s: int, description: str | None = None) -> dict:
    """TFA-style: for each class of ``novel_ids`` (in this order) pick images of the COCO dict
    ``oracle`` until exactly ``k`` instances of it are annotated; sampling seed ``s``. Returns a COCO
    dict of the picked images with those classes' boxes on them."""
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
                f"too few boxes for {k}-shot: cannot pick exactly {k} instances of "
                f"'{names[cid]}' from {sum(per_cls_img[cid].values())} in the annotations"
            )
        for im in picked:
            chosen_imgs.add(im)
            chosen_anns.extend(by_img_cls[(im, cid)])
    images = [im for im in oracle["images"] if im["id"] in chosen_imgs]
    anns = sorted(chosen_anns, key=lambda a: a["id"])
    return {
        # the source's info (e.g. its annotation version) with this subset's description
        "info": {**oracle.get("info", {}), "description": description or f"{k}-shot subset, sampling seed {s}"},
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
