"""What the distillation targets hold: where the cached (non-GT) boxes lie and what the teacher calls them.

    python tools/distill_targets.py configs/mini/bench.yaml [overrides] [--cache DIR] [--out FILE.json]

Reads a feature cache (``extract.out`` by default; the ablation's (b) and (c) caches of random
boxes live in ``<work_dir>/ablation/<variant>/feature_cache``) and sorts every distilled box that
is not a GT box by its best IoU with *all* objects of its train image (the mini-world's oracle
file, ``det/train_oracle.json``: base and novel):

* ``novel`` / ``base``: IoU >= 0.5 with a novel / base object (a box the detector could keep),
* ``part of novel`` / ``part of base``: 0.1 <= IoU < 0.5 (off-centre crops, object parts),
* ``background``: IoU < 0.1 with every object.

For each group it gives the share of boxes and the share whose cached embedding (the teacher's
target) is closest, among all base + novel names, to a novel name. A box half on a base object
whose target names a novel class teaches the detector to call base objects' parts novel.

Why a tool: the miner's recall probe (``tools/bench_miner.py --recall``) counts novel objects that
*some* mined box hits; it says nothing about the other boxes, which are most of the targets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torchvision.ops import box_iou

from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.data.splits import resolve_split
from ovd.errors import OvdError
from ovd.mining.feature_cache import FeatureCache
from ovd.utils.io import write_json
from ovd.vlm.clip import clip_from_config

GROUPS = ("novel", "base", "part of novel", "part of base", "background")


def group_of(boxes: torch.Tensor, gt: torch.Tensor, gt_novel: torch.Tensor) -> list[str]:
    """Each box's group (``GROUPS``) from its best IoU with the image's objects."""
    if len(gt) == 0:
        return ["background"] * len(boxes)
    best, j = box_iou(boxes, gt).max(dim=1)
    out = []
    for b, k in zip(best.tolist(), j.tolist()):
        kind = "novel" if bool(gt_novel[k]) else "base"
        out.append(kind if b >= 0.5 else f"part of {kind}" if b >= 0.1 else "background")
    return out


def composition(cache: dict[int, dict], objects: dict[int, tuple[torch.Tensor, torch.Tensor]],
                names_novel: torch.Tensor, text: torch.Tensor) -> dict:  # fmt: skip
    """Share of each group among the non-GT boxes, and per group the share whose target's nearest
    name is novel. ``cache``: image id -> the feature cache's rows (``FeatureCache.get``);
    ``objects``: image id -> (xyxy boxes, is-novel flags); ``text``: (names, D) normalised name
    embeddings; ``names_novel``: (names,) bool."""
    groups: list[str] = []
    emb = []
    for i, rows in cache.items():
        keep = ~rows["is_gt"].bool()
        gt, novel = objects.get(i, (torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool)))
        groups += group_of(rows["boxes"][keep].float(), gt, novel)
        emb.append(rows["embeddings"][keep].float())
    if not groups:
        raise OvdError("the cache holds GT boxes only: nothing was mined or sampled")
    nearest_novel = names_novel[(torch.nn.functional.normalize(torch.cat(emb), dim=-1) @ text.T).argmax(dim=1)]
    out = {"boxes": len(groups), "images": len(cache)}
    for g in GROUPS:
        sel = torch.tensor([x == g for x in groups])
        n = int(sel.sum())
        out[g] = {"share": round(n / len(groups), 4),
                  "named_novel": round(float(nearest_novel[sel].float().mean()), 4) if n else None}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--cache", help="feature cache folder (default: the config's extract.out)")
    ap.add_argument("--out", help="write the report here (JSON) as well as printing it")
    args = ap.parse_intermixed_args(argv)
    torch.set_num_threads(1)  # a few matrix products: one thread, so it can run beside training jobs
    try:
        cfg = load_config(args.config, args.overrides)
        reader = FeatureCache(args.cache or cfg.extract.out)  # checks the cache is committed and whole
        cache = {i: reader.get(i) for i in reader.image_ids}
        oracle_path = Path(cfg.data.train_json).parent / "train_oracle.json"
        if not oracle_path.is_file():
            raise OvdError(f"{oracle_path}: missing; this probe needs the mini-world's oracle file (all objects)")
        oracle = load_detection_dataset(oracle_path, cfg.data.image_root or None)
        split = resolve_split(cfg.data.split, oracle.categories, source=str(oracle.path))
        novel_ids = set(split.novel_ids)
        objects = {}
        for i in range(len(oracle)):
            rec = oracle.record(i)
            boxes = torch.tensor(rec["boxes"], dtype=torch.float32).reshape(-1, 4)
            objects[rec["image_id"]] = (boxes, torch.tensor([c in novel_ids for c in rec["labels"]], dtype=torch.bool))
        # the targets were encoded by the adapted CLIP where the adapter was on: name them with the same one
        clip = clip_from_config(cfg.clip, cfg.adapter.out if cfg.adapter.enabled else None)
        names = list(split.base_names) + list(split.novel_names)
        text = clip.encode_text(names, list(cfg.clip.templates)).float()
        names_novel = torch.tensor([False] * len(split.base_names) + [True] * len(split.novel_names))
        report = composition(cache, objects, names_novel, text)
    except OvdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["cache"] = str(args.cache or cfg.extract.out)
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)  # atomic: a report is whole or absent
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
