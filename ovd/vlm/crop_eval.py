"""``ovd vlm eval``: how well a CLIP (optionally adapted) classifies detection-domain GT crops.

Top-1 accuracy of EZSD crops of every val GT box against *all* class names of the split (base and
novel together, as a detector's classifier sees them), reported separately for base and novel
boxes. Comparing raw vs adapted CLIP here is the adapter's direct measure.
"""

from __future__ import annotations

import torch

from ovd.data.loading import load_split_dataset
from ovd.vlm.adapter import collect_gt_crops
from ovd.vlm.clip import clip_from_config


def crop_accuracy(clip, dataset, split, templates, batch_size: int = 256, progress: bool = True) -> dict:
    ids = list(split.base_ids) + list(split.novel_ids)
    names = list(split.base_names) + list(split.novel_names)
    crops, labels = collect_gt_crops(clip, dataset, ids, progress=progress)
    emb = clip.encode_normalized(crops, batch_size)
    pred = (emb @ clip.encode_text(names, templates).T).argmax(dim=1)
    correct = pred == labels
    is_base = labels < len(split.base_ids)
    out = {"top1_all": float(correct.float().mean())}
    for group, mask in (("base", is_base), ("novel", ~is_base)):
        out[f"top1_{group}"] = float(correct[mask].float().mean()) if mask.any() else None
        out[f"num_{group}"] = int(mask.sum())
    return out


def run_crop_eval(cfg, adapter: str | None = None, progress: bool = True) -> dict:
    # the val boxes are cropped, not scored: read like a training set (degenerate boxes skipped)
    val, split = load_split_dataset(
        cfg.data, "val", need_split="vlm eval", why="to report base and novel accuracy", as_ground_truth=False
    )
    clip = clip_from_config(cfg.clip, adapter)
    with torch.no_grad():
        res = crop_accuracy(clip, val, split, list(cfg.clip.templates), cfg.clip.batch_size, progress)
    res["clip"] = clip.source
    res["adapter"] = str(adapter) if adapter else None
    return res
