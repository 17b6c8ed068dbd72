"""Cost model of the CLIP stages (mining and feature extraction) for a config and a dataset.

Per image, the number of candidate crops the miner encodes: the config's dense anchors clipped to
the image, de-duplicated, minus those overlapping a base GT box above ``miner.base_iou_thr`` —
computed with the miner's own functions (``dense_anchors``, ``filter_base_overlap``, exactly the
steps of ``candidate_boxes``; the anchors are computed once per image size). Then the measured
crops/s of the config's CLIP on this machine (EZSD crops of random boxes from a 640x480 image,
``ClipModel.encode_boxes``: roi_align + image tower, the miner's path) and the projected time of
mining (all candidates) and extraction (base GT boxes + at most ``miner.topk`` proposals per image,
an upper bound) on N GPUs at a given crops/s.

    python tools/estimate_cost.py configs/coco/ovd_48_17_ezsd.yaml --synthetic coco --threads 1,2
    python tools/estimate_cost.py configs/lvis/ovd_rare_ezsd.yaml --synthetic lvis --crops-per-s 2000 --gpus 8
    python tools/estimate_cost.py configs/mini/smoke.yaml --json data/mini-smoke/det/train.json

The CLIP's speed does not depend on its weights: a config naming pretrained weights that are not
on this machine (``ViT-B-32`` / ``openai``) is timed with the same architecture randomly
initialised (``open_clip.create_model(name)``); a ``local-dir:`` CLIP is loaded as configured.

``--synthetic coco|lvis`` builds the dataset statistics in memory instead of reading a JSON (see
:func:`synthetic_dataset` for the assumed image-size mix and box statistics).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.data.coco_categories import COCO_CATEGORIES
from ovd.data.splits import resolve_split
from ovd.errors import OvdError
from ovd.mining.miner import dense_anchors, filter_base_overlap, gt_boxes_of

# COCO train2017 image sizes (W, H) and their assumed shares: 640x480 dominates, then 640x427 and
# the portrait versions; a few square and 16:9 images. An assumption stated in the report, not a
# count of the real file (which is not on this machine).
COCO_SIZE_MIX = [
    ((640, 480), 0.45), ((640, 427), 0.20), ((480, 640), 0.12), ((427, 640), 0.08), ((640, 426), 0.05),
    ((640, 425), 0.04), ((612, 612), 0.02), ((500, 375), 0.02), ((640, 360), 0.02),
]  # fmt: skip
# COCO box sizes: ~41% small (sqrt(area) < 32), 34% medium (32-96), 25% large (COCO's published mix)
COCO_SIZE_BANDS = [((4.0, 32.0), 0.41), ((32.0, 96.0), 0.34), ((96.0, 480.0), 0.25)]
# LVIS has more small objects (many small, exhaustively annotated things)
LVIS_SIZE_BANDS = [((4.0, 32.0), 0.50), ((32.0, 96.0), 0.32), ((96.0, 480.0), 0.18)]
SYNTHETIC = {
    # images, mean boxes per image
    "coco": (118_287, 7.3),
    "lvis": (100_170, 12.1),
}
LVIS_FREQ = {"r": 337, "c": 461, "f": 405}  # LVIS v1 category counts by frequency (1,203 in all)
LVIS_BOX_SHARE = {"r": 0.005, "c": 0.095, "f": 0.90}  # assumed share of train boxes by frequency


def _pick(rng: random.Random, items):
    r, acc = rng.random(), 0.0
    for value, p in items:
        acc += p
        if r < acc:
            return value
    return items[-1][0]


def synthetic_dataset(kind: str, num_images: int | None = None, seed: int = 0) -> dict:
    """A COCO/LVIS-like annotation dict (images with sizes, boxes, categories) built in memory.

    * images: sizes drawn from :data:`COCO_SIZE_MIX` (LVIS v1 uses the same COCO images);
    * boxes per image: Poisson with mean 7.3 (COCO train 2017: 860,001 boxes / 118,287 images) or
      12.1 (LVIS v1 train, the figure this model was specified with; not re-counted here, the
      real annotation file is not on this machine);
    * box size: sqrt(area) log-uniform within COCO's small / medium / large bands with the shares of
      :data:`COCO_SIZE_BANDS` (:data:`LVIS_SIZE_BANDS`), aspect h/w log-normal (sigma 0.5), clipped
      to the image, position uniform;
    * classes: COCO — person 27% of boxes, the other 79 classes Zipf-like (1 / rank^0.8) in id order;
      LVIS — 1,203 categories (337 rare, 461 common, 405 frequent), boxes by frequency bucket
      :data:`LVIS_BOX_SHARE`, uniform within a bucket.
    """
    if kind not in SYNTHETIC:
        raise OvdError(f"--synthetic must be one of {', '.join(SYNTHETIC)}, got {kind!r}")
    n_default, mean_boxes = SYNTHETIC[kind]
    n = n_default if num_images is None else num_images
    rng = random.Random(seed)
    if kind == "coco":
        categories = [{"id": i, "name": name} for i, name in COCO_CATEGORIES]
        weights = [0.27] + [1.0 / (r + 1) ** 0.8 for r in range(1, len(categories))]
        tail = sum(weights[1:])
        weights = [0.27] + [w / tail * 0.73 for w in weights[1:]]
        cat_ids = [c["id"] for c in categories]
        bands = COCO_SIZE_BANDS

        def draw_cat():
            return rng.choices(cat_ids, weights=weights)[0]
    else:
        categories, by_freq, k = [], {}, 0
        for freq, count in LVIS_FREQ.items():
            for _ in range(count):
                k += 1
                categories.append({"id": k, "name": f"lvis_{freq}_{k:04d}", "frequency": freq})
                by_freq.setdefault(freq, []).append(k)
        bands = LVIS_SIZE_BANDS
        freq_items = list(LVIS_BOX_SHARE.items())

        def draw_cat():
            return rng.choice(by_freq[_pick(rng, freq_items)])

    images, annotations = [], []
    for i in range(n):
        w, h = _pick(rng, COCO_SIZE_MIX)
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": w, "height": h})
        # Poisson(mean_boxes) by Knuth's method (mean <= 13: fine)
        limit, m, p = math.exp(-mean_boxes), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                break
            m += 1
        for _ in range(m):
            lo, hi = _pick(rng, bands)
            side = math.exp(rng.uniform(math.log(lo), math.log(min(hi, max(w, h)))))
            aspect = math.exp(rng.gauss(0.0, 0.5))
            bw, bh = min(w, side / math.sqrt(aspect)), min(h, side * math.sqrt(aspect))
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": draw_cat(),
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": categories}


class _Records:
    """The per-image records the miner reads (``DetectionDataset.record`` layout), for a dict."""

    def __init__(self, data: dict):
        self.images = data["images"]
        self.by_image: dict[int, list] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                self.by_image.setdefault(a["image_id"], []).append(a)

    def __len__(self) -> int:
        return len(self.images)

    def record(self, i: int) -> dict:
        im = self.images[i]
        anns = self.by_image.get(im["id"], [])
        return {
            "image_id": im["id"],
            "width": im["width"],
            "height": im["height"],
            "boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
            "labels": [a["category_id"] for a in anns],
        }


def base_ids_of(split_spec: str, categories: list[dict], kind: str | None) -> set[int]:
    """Base category ids: the config's split, or for synthetic data the matching named split."""
    split_spec = {"coco": "coco_ovd_48_17", "lvis": "lvis_rare"}.get(kind or "", split_spec)
    return set(resolve_split(split_spec, categories, source="dataset").base_ids)


def count_candidates(records, m, base_ids: set[int], progress: bool = False) -> dict:
    """Per-image candidate counts under miner settings ``m`` (see module doc), plus totals: the
    number of candidate crops (mining) and of base GT boxes (the GT part of extraction)."""
    from tqdm import tqdm

    anchors: dict[tuple[int, int], torch.Tensor] = {}
    per_image, base_gt_total = [], 0
    for i in tqdm(range(len(records)), desc="count candidates", disable=not progress, mininterval=2):
        rec = records.record(i)
        h, w = int(rec["height"]), int(rec["width"])
        if (h, w) not in anchors:
            anchors[(h, w)] = dense_anchors(h, w, m.stride, list(m.scales), list(m.ratios), m.min_size)
        cand = anchors[(h, w)]
        gt = gt_boxes_of(rec, base_ids)
        n = len(filter_base_overlap(cand, gt, m.base_iou_thr)) if len(gt) else len(cand)
        per_image.append(n)
        base_gt_total += len(gt)
    return {
        "per_image": per_image,
        "images": len(per_image),
        "candidates": sum(per_image),
        "base_gt_boxes": base_gt_total,
        "anchors_by_size": {f"{w}x{h}": len(a) for (h, w), a in sorted(anchors.items())},
    }


def _timing_clip(c):
    """The config's CLIP for timing: as configured when it loads; else (weights not on this machine)
    the same open_clip architecture with random weights."""
    import open_clip

    from ovd.vlm.clip import ClipModel

    try:  # no download attempt: a missing file or tag falls back to random weights at once
        return ClipModel.load(c.model, c.pretrained or None, device=c.device, allow_download=False), "as configured"
    except OvdError as e:
        if c.model.startswith("local-dir:") or c.model not in open_clip.list_models():
            raise
        net = open_clip.create_model(c.model)  # same architecture, random weights: the same speed
        size = net.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        clip = ClipModel(net, open_clip.get_tokenizer(c.model), size, open_clip.OPENAI_DATASET_MEAN,
                         open_clip.OPENAI_DATASET_STD, name=c.model, source=f"{c.model}/random-init")  # fmt: skip
        return clip, f"random init ({str(e)[:80]}...)"


def measure_crops_per_s(clip, threads: int, batch: int = 64, seconds: float = 10.0, seed: int = 0) -> dict:
    """Crops/s of ``clip.encode_boxes`` (EZSD roi_align crops + image tower) on a random 640x480
    image with random boxes, ``threads`` torch threads, after one warm-up batch; runs batches until
    ``seconds`` have passed (at least 2)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(3, 480, 640, generator=g)
        xy = torch.rand(batch, 2, generator=g) * torch.tensor([560.0, 400.0])
        wh = 16 + torch.rand(batch, 2, generator=g) * 300
        boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([640.0, 480.0]))], dim=1)
        with torch.inference_mode():
            clip.encode_boxes(image, boxes, batch)  # warm-up
            n, t0 = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - t0 < seconds:
                clip.encode_boxes(image, boxes, batch)
                n += 1
            dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    return {"threads": threads, "batch": batch, "batches": n, "seconds": round(dt, 2),
            "crops_per_s": round(n * batch / dt, 2)}  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def project(total_crops: int, crops_per_s: float, gpus: int) -> dict:
    s = total_crops / (crops_per_s * gpus)
    return {"seconds": round(s, 1), "human": _duration(s)}


def estimate(cfg, data: dict | None, kind: str | None, progress: bool = False) -> dict:
    """Candidate counts for ``cfg`` on ``data`` (a dict) or on ``cfg.data.train_json``."""
    m = cfg.miner
    if data is None:
        ds = load_detection_dataset(cfg.data.train_json, lvis=None, drop_degenerate=True)  # as the miner reads it
        records, categories, source = ds, ds.categories, str(ds.path)
    else:
        records, categories, source = _Records(data), data["categories"], f"synthetic {kind}"
    base_ids = base_ids_of(cfg.data.split, categories, kind)
    counts = count_candidates(records, m, base_ids, progress)
    per = counts["per_image"]
    extract_props = sum(min(n, m.topk) for n in per)  # after NMS there are at most topk (often fewer)
    return {
        "dataset": source,
        "images": counts["images"],
        "base_classes": len(base_ids),
        "miner": {
            "stride": m.stride,
            "scales": list(m.scales),
            "ratios": list(m.ratios),
            "min_size": m.min_size,
            "base_iou_thr": m.base_iou_thr,
            "topk": m.topk,
        },
        "anchors_by_size": counts["anchors_by_size"],
        "candidates_per_image": {
            "mean": round(sum(per) / max(1, len(per)), 1),
            "min": min(per, default=0),
            "max": max(per, default=0),
        },
        "mining_crops": counts["candidates"],
        "extraction_crops_upper_bound": extract_props + counts["base_gt_boxes"],
        "base_gt_boxes": counts["base_gt_boxes"],
        "external_proposals_not_counted": bool(m.external_proposals),
        "per_image": per,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--json", default=None, help="dataset JSON (default: the config's data.train_json)")
    src.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="build COCO / LVIS train statistics in memory")
    ap.add_argument("--synthetic-images", type=int, default=None, help="fewer synthetic images (scaled up after)")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--crops-per-s", type=float, default=None, help="per GPU (default: the one measured here)")
    ap.add_argument("--threads", default="1", help="torch threads to measure crops/s with, e.g. 1,2")
    ap.add_argument("--batch", type=int, default=64, help="crops per CLIP forward when measuring")
    ap.add_argument("--seconds", type=float, default=10.0, help="time to measure for, per thread count")
    ap.add_argument("--no-measure", action="store_true", help="skip the speed measurement (needs --crops-per-s)")
    ap.add_argument("--out", default=None, help="write the full report (with per-image counts) as JSON")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may follow the options
    try:
        overrides = list(args.overrides) + ([f"data.train_json={args.json}"] if args.json else [])
        cfg = load_config(args.config, overrides)
        if args.gpus < 1:
            raise OvdError("--gpus must be at least 1")
        if args.no_measure and not args.crops_per_s:
            raise OvdError("--no-measure needs --crops-per-s")
        data = synthetic_dataset(args.synthetic, args.synthetic_images) if args.synthetic else None
        t0 = time.time()
        rep = estimate(cfg, data, args.synthetic, progress=sys.stderr.isatty())
        rep["count_seconds"] = round(time.time() - t0, 1)
        scale = 1.0
        if args.synthetic and args.synthetic_images:
            scale = SYNTHETIC[args.synthetic][0] / rep["images"]
            rep["scaled_to_images"] = SYNTHETIC[args.synthetic][0]
        rep["mining_crops_total"] = round(rep["mining_crops"] * scale)
        rep["extraction_crops_total"] = round(rep["extraction_crops_upper_bound"] * scale)
        measured = []
        if not args.no_measure:
            clip, how = _timing_clip(cfg.clip)
            rep["clip"] = {"model": cfg.clip.model, "timed_with": how, "embed_dim": clip.embed_dim,
                           "device": str(clip.device)}  # fmt: skip
            for t in [int(x) for x in str(args.threads).split(",") if x.strip()]:
                measured.append(measure_crops_per_s(clip, t, args.batch, args.seconds))
        rep["measured"] = measured
        rate = args.crops_per_s or max(x["crops_per_s"] for x in measured)
        rep["projection"] = {
            "crops_per_s_per_gpu": rate,
            "crops_per_s_from": "--crops-per-s" if args.crops_per_s else "measured here (best thread count)",
            "gpus": args.gpus,
            "mining": project(rep["mining_crops_total"], rate, args.gpus),
            "extraction_upper_bound": project(rep["extraction_crops_total"], rate, args.gpus),
        }
        if args.out:
            Path(args.out).write_text(json.dumps(rep, indent=1) + "\n")
        short = {k: v for k, v in rep.items() if k != "per_image"}
        print(json.dumps(short, indent=2))
    except OvdError as e:
        print(f"estimate_cost: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
