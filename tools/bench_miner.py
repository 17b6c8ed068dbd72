"""Miner benchmark: fast vs naive crop+encode path, and novel-object recall of mined proposals.

Speed (``--speed``): on the same images and the same candidate boxes, the fast path (one
``roi_align`` call per image for all crops, batched CLIP forwards, text classifier computed once)
against the naive path (PIL crop + resize one box at a time, one CLIP forward per crop). Both feed
the same selection (objectness, NMS, top-K); the script first checks they keep the same boxes,
then reports crops/s of each and the ratio.

Recall (``--recall``): recall at IoU 0.5 of the *novel* objects in the train images (known only to
the generator: ``det/train_oracle.json``) by the top-K boxes per image of
  * ``miner``      — CLIP vs base + novel names (EZSD, the default miner),
  * ``miner_no_background_prompts`` — the same without ``miner.background_prompts``,
  * ``base_names`` — CLIP vs base names only (a base-biased miner),
  * ``random``     — K random candidates,
all from the same candidates (anchors minus base-GT overlaps) and the same embeddings.

    python tools/bench_miner.py configs/mini/bench.yaml --speed --images 20
    python tools/bench_miner.py configs/mini/bench.yaml --recall
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou

from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.data.images import load_image
from ovd.data.splits import resolve_split
from ovd.errors import OvdError
from ovd.mining.miner import candidate_boxes, gt_boxes_of, select
from ovd.vlm.clip import CROP_ENLARGE, clip_from_config, crop_boxes_square


def naive_encode(clip, pil: Image.Image, boxes: torch.Tensor, pad: int = 64) -> torch.Tensor:
    """One box at a time: PIL crop-and-resize of the EZSD square (sub-pixel box, anti-aliased
    bilinear, mean-colour padding outside the image), then one CLIP forward per crop."""
    mean = tuple(int(round(255 * v)) for v in clip.mean.flatten().tolist())
    padded = Image.new("RGB", (pil.width + 2 * pad, pil.height + 2 * pad), mean)
    padded.paste(pil, (pad, pad))
    out = []
    for x0, y0, x1, y1 in crop_boxes_square(boxes, CROP_ENLARGE).tolist():
        box = (max(0.0, x0 + pad), max(0.0, y0 + pad), min(padded.width, x1 + pad), min(padded.height, y1 + pad))
        crop = padded.resize((clip.image_size, clip.image_size), Image.BILINEAR, box=box)
        x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
        with torch.no_grad():
            out.append(F.normalize(clip.model.encode_image(clip.normalize(x)[None]), dim=-1))
    return torch.cat(out)


def setup(cfg):
    train = load_detection_dataset(cfg.data.train_json, cfg.data.image_root or None)
    split = resolve_split(cfg.data.split, train.categories, source=str(train.path))
    clip = clip_from_config(cfg.clip, cfg.adapter.out if cfg.adapter.enabled else None)
    return train, split, clip


def speed(cfg, n_images: int) -> dict:
    train, split, clip = setup(cfg)
    m = cfg.miner
    text = clip.encode_text(list(split.base_names) + list(split.novel_names), list(cfg.clip.templates))
    bg = clip.encode_text(list(m.background_prompts), list(cfg.clip.templates)) if m.background_prompts else None
    scale = clip.model.logit_scale.exp().item()
    base_ids = set(split.base_ids)
    recs = [train.record(i) for i in range(min(n_images, len(train)))]
    images = [load_image(r["path"]) for r in recs]
    pils = [Image.open(r["path"]).convert("RGB") for r in recs]
    cands = [candidate_boxes(im.shape[1], im.shape[2], m, gt_boxes_of(r, base_ids)) for im, r in zip(images, recs)]
    n_crops = sum(len(c) for c in cands)
    clip.encode_boxes(images[0], cands[0][:8])  # warm-up

    t = time.perf_counter()
    fast = [select(c, clip.encode_boxes(im, c, m.batch_size), text, scale, m, bg) for im, c in zip(images, cands)]
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    naive_emb = [naive_encode(clip, p, c) for p, c in zip(pils, cands)]
    naive = [select(c, e, text, scale, m, bg) for c, e in zip(cands, naive_emb)]
    t_naive = time.perf_counter() - t
    # same crops, two implementations: their embeddings must agree
    cos = torch.cat([(clip.encode_boxes(im, c, m.batch_size) * e).sum(1) for im, c, e in zip(images, cands, naive_emb)])

    same = total = 0
    for a, b in zip(fast, naive):
        ka = {tuple(x) for x in a["boxes"].tolist()}
        kb = {tuple(x) for x in b["boxes"].tolist()}
        same += len(ka & kb)
        total += max(len(ka), len(kb))
    return {
        "images": len(recs),
        "crops": n_crops,
        "fast_crops_per_s": round(n_crops / t_fast, 1),
        "naive_crops_per_s": round(n_crops / t_naive, 1),
        "speedup": round(t_naive / t_fast, 2),
        "kept_box_agreement": round(same / max(1, total), 4),
        "embedding_cosine_mean": round(float(cos.mean()), 4),
        "embedding_cosine_min": round(float(cos.min()), 4),
        "torch_threads": torch.get_num_threads(),
    }


def recall(cfg, n_images: int, iou: float = 0.5) -> dict:
    train, split, clip = setup(cfg)
    m = cfg.miner
    # every object of the train images, whatever the split (the generator's own record): found beside
    # the train file of any split (train.json, train_heldout_cross.json, ...) in the world's det/
    oracle_path = Path(cfg.data.train_json).parent / "train_oracle.json"
    if not oracle_path.is_file():
        raise OvdError(f"--recall needs the mini-world's oracle file {oracle_path} (all objects of the train images)")
    oracle = load_detection_dataset(oracle_path, cfg.data.image_root or None)
    novel_ids, base_ids = set(split.novel_ids), set(split.base_ids)
    t_all = clip.encode_text(list(split.base_names) + list(split.novel_names), list(cfg.clip.templates))
    t_base = clip.encode_text(list(split.base_names), list(cfg.clip.templates))
    bg = clip.encode_text(list(m.background_prompts), list(cfg.clip.templates)) if m.background_prompts else None
    scale = clip.model.logit_scale.exp().item()
    gen = torch.Generator().manual_seed(cfg.seed)
    hits = {"miner": 0, "miner_no_background_prompts": 0, "base_names": 0, "random": 0}
    n_novel = 0
    t0 = time.time()
    n = min(n_images, len(train)) if n_images else len(train)
    for i in range(n):
        rec = train.record(i)
        orec = oracle.record(oracle.image_ids.index(rec["image_id"]))
        novel = torch.tensor([b for b, c in zip(orec["boxes"], orec["labels"]) if c in novel_ids]).reshape(-1, 4)
        image = load_image(rec["path"])
        cand = candidate_boxes(image.shape[1], image.shape[2], m, gt_boxes_of(rec, base_ids))
        if len(novel) == 0 or len(cand) == 0:
            n_novel += len(novel)
            continue
        emb = clip.encode_boxes(image, cand, m.batch_size)
        picks = {
            "miner": select(cand, emb, t_all, scale, m, bg)["boxes"],
            "miner_no_background_prompts": select(cand, emb, t_all, scale, m)["boxes"],
            "base_names": select(cand, emb, t_base, scale, m, bg)["boxes"],
            "random": cand[torch.randperm(len(cand), generator=gen)[: m.topk]],
        }
        for k, boxes in picks.items():
            if len(boxes):
                hits[k] += int((box_iou(novel, boxes).amax(dim=1) >= iou).sum())
        n_novel += len(novel)
    return {
        "images": n,
        "novel_objects": n_novel,
        "topk": m.topk,
        "iou": iou,
        **{f"recall_{k}": round(v / max(1, n_novel), 4) for k, v in hits.items()},
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--recall", action="store_true")
    ap.add_argument("--images", type=int, default=0, help="images to use (speed default 10, recall default all)")
    ap.add_argument("--min-agreement", type=float, default=0.9, help="fail if fast and naive keep fewer common boxes")
    args = ap.parse_intermixed_args()  # key=value overrides may follow the options
    cfg = load_config(args.config, args.overrides)
    out = {}
    if args.speed:
        out["speed"] = speed(cfg, args.images or 10)
        if out["speed"]["kept_box_agreement"] < args.min_agreement:
            print(json.dumps(out, indent=2))
            raise SystemExit(
                f"fast and naive paths keep different boxes (agreement {out['speed']['kept_box_agreement']})"
            )
    if args.recall:
        out["recall"] = recall(cfg, args.images)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
