"""Where a detector's novel-class detections land: right, on the wrong object, or on nothing.

    python tools/novel_errors.py GT.json DETECTIONS.json --novel NAME [NAME ...] [--out FILE.json]
    python tools/novel_errors.py data/mini-bench/det/val.json work_dirs/mini-bench/ablation/e_full/detections.json \
        --split-file data/mini-bench/split.json

Takes, for each novel class, the detector's highest-scoring detections of that class, at most as many as
the class has GT objects (what a perfect detector would need; AP ranks per class too), and sorts
each by its best-IoU GT object:

* ``correct``: IoU >= 0.5 with an object of the same class (and that object not already taken by a
  higher-scoring detection: a duplicate counts as ``duplicate``),
* ``other novel``: IoU >= 0.5 with a novel object of another class,
* ``base object``: IoU >= 0.5 with a base object (a base object called novel),
* ``mislocalised``: 0.1 <= IoU < 0.5 with some object,
* ``background``: IoU < 0.1 with every object.

COCO AP says how good the ranking is, not what the top of the ranking is made of; this says which
error a change of training moved. pycocotools gives no such breakdown for a class split, hence a
small tool.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torchvision.ops import box_convert, box_iou

from ovd.data.splits import read_split_file
from ovd.errors import OvdError
from ovd.utils.io import read_json, write_json

GROUPS = ("correct", "duplicate", "other novel", "base object", "mislocalised", "background")


def breakdown(gt: dict, dets: list[dict], novel_ids: set[int]) -> dict:
    """Shares of ``GROUPS`` among the top novel-class detections (``gt``: a COCO dict)."""
    objects: dict[int, list[tuple[list[float], int]]] = {}
    per_class: dict[int, int] = {}
    for a in gt["annotations"]:
        objects.setdefault(a["image_id"], []).append((a["bbox"], a["category_id"]))
        if a["category_id"] in novel_ids:
            per_class[a["category_id"]] = per_class.get(a["category_id"], 0) + 1
    n_novel = sum(per_class.values())
    # per class, as AP ranks: each novel class's top-scoring detections, as many as it has objects
    # (scores of different classes need not be comparable, so no ranking across classes)
    by_class: dict[int, list[dict]] = {}
    for d in dets:
        if d["category_id"] in per_class:
            by_class.setdefault(d["category_id"], []).append(d)
    top = []
    for c, n in per_class.items():
        top += sorted(by_class.get(c, []), key=lambda d: -d["score"])[:n]
    counts = dict.fromkeys(GROUPS, 0)
    taken: set[tuple[int, int]] = set()
    for d in top:
        objs = objects.get(d["image_id"], [])
        if not objs:
            counts["background"] += 1
            continue
        boxes = box_convert(torch.tensor([o[0] for o in objs], dtype=torch.float64), "xywh", "xyxy")
        iou = box_iou(box_convert(torch.tensor([d["bbox"]], dtype=torch.float64), "xywh", "xyxy"), boxes)[0]
        same = torch.tensor([o[1] == d["category_id"] for o in objs])
        # a same-class object at IoU >= 0.5 first (what COCO matching would do), else the best overlap
        if bool(((iou >= 0.5) & same).any()):
            k = int(torch.where(same, iou, torch.full_like(iou, -1)).argmax())
            key = (d["image_id"], k)
            counts["duplicate" if key in taken else "correct"] += 1
            taken.add(key)
            continue
        k = int(iou.argmax())
        if iou[k] >= 0.5:
            counts["other novel" if objs[k][1] in novel_ids else "base object"] += 1
        else:
            counts["mislocalised" if iou[k] >= 0.1 else "background"] += 1
    n = max(1, len(top))
    return {"novel_objects": n_novel, "detections": len(top), **{g: round(counts[g] / n, 4) for g in GROUPS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gt", help="COCO-format GT with every class (base and novel)")
    ap.add_argument("detections", help="COCO result list (ovd's detections.json)")
    names = ap.add_mutually_exclusive_group(required=True)
    names.add_argument("--novel", nargs="+", help="novel class names")
    names.add_argument("--split-file", help="a split file: base and novel names (the mini-world's split.json)")
    ap.add_argument("--out", help="write the report here (JSON) as well as printing it")
    args = ap.parse_args(argv)
    try:
        gt = read_json(args.gt, "GT file")
        dets = read_json(args.detections, "detections file")
        if not isinstance(gt, dict) or not {"annotations", "categories"} <= set(gt):
            raise OvdError(f"{args.gt}: expected a COCO dict with 'annotations' and 'categories'")
        if not isinstance(dets, list):
            raise OvdError(f"{args.detections}: expected a list of detections (COCO result format)")
        wanted = args.novel or read_split_file(args.split_file)[1]  # (base, novel), checked
        by_name = {c["name"]: c["id"] for c in gt["categories"]}
        unknown = sorted(set(wanted) - set(by_name))
        if unknown or not wanted:
            raise OvdError(f"novel names not among {args.gt}'s categories: {unknown or 'none given'}")
    except OvdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = breakdown(gt, dets, {by_name[n] for n in wanted})
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)  # atomic: a report is whole or absent
    return 0


if __name__ == "__main__":
    sys.exit(main())
