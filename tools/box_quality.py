"""How well a detector's boxes fit, per class group: does semantic regression change localisation?

    python tools/box_quality.py configs/mini/bench.yaml RUN_DIR [RUN_DIR ...] [--score-thr 0.05] [overrides ...]

For each run folder (``train.out`` of ``ovd run`` / ``ovd test``: its ``detections.json`` on the
config's val file), every val GT box of a base or novel class gets its best IoU with a detection of
the same class scoring at least ``--score-thr``. Reported per group: the share of GT boxes found at
IoU >= 0.5 and >= 0.75 and the mean best IoU of the boxes found at >= 0.5 (localisation of what was
found, independent of how many were found).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torchvision.ops import box_convert, box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovd.config import load_config  # noqa: E402
from ovd.data.splits import resolve_split  # noqa: E402


def quality(gt: dict, dets: list[dict], groups: dict[str, set[int]], thr: float) -> dict:
    by_key = defaultdict(list)
    for d in dets:
        if d["score"] >= thr:
            by_key[(d["image_id"], d["category_id"])].append(d["bbox"])
    best = defaultdict(list)
    for a in gt["annotations"]:
        group = next((g for g, ids in groups.items() if a["category_id"] in ids), None)
        if group is None:
            continue
        cand = by_key.get((a["image_id"], a["category_id"]))
        iou = 0.0
        if cand:
            g_box, d_box = (
                box_convert(torch.tensor(b, dtype=torch.float64), "xywh", "xyxy") for b in ([a["bbox"]], cand)
            )
            iou = box_iou(g_box, d_box).max().item()
        best[group].append(iou)
    out = {}
    for g, ious in best.items():
        t = torch.tensor(ious)
        found = t[t >= 0.5]
        out[g] = {"gt": len(ious), "found@0.5": round((t >= 0.5).float().mean().item(), 4),
                  "found@0.75": round((t >= 0.75).float().mean().item(), 4),
                  "mean_iou_of_found": round(found.mean().item(), 4) if len(found) else None}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("runs", nargs="+", help="run folders holding detections.json, then key=value overrides")
    ap.add_argument("--score-thr", type=float, default=0.05)
    args = ap.parse_args()
    runs = [r for r in args.runs if "=" not in r]
    cfg = load_config(args.config, [r for r in args.runs if "=" in r])
    gt = json.loads(Path(cfg.data.val_json).read_text())
    from ovd.data.coco import load_detection_dataset

    split = resolve_split(
        cfg.data.split, load_detection_dataset(cfg.data.val_json, None, drop_degenerate=False).categories
    )
    groups = {"base": set(split.base_ids), "novel": set(split.novel_ids)}
    result = {}
    for run in runs:
        dets = json.loads((Path(run) / "detections.json").read_text())
        result[run] = quality(gt, dets, groups, args.score_thr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
