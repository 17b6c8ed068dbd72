"""Evaluating the detector on the val set with base + novel names: ``ovd test`` and the periodic
evaluation during training. Detections are COCO result lists; metrics come from ``ovd eval``.

A detector with a mask head also gives each detection its mask (COCO compressed RLE
``segmentation``, thresholded at :data:`~ovd.data.masks.MASK_THRESHOLD`), and is evaluated for
box and mask AP (mask metrics are named ``mask_AP`` ...)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ovd.data.boxes import coco_bbox
from ovd.data.loader import ImageSet, make_loader
from ovd.data.loading import load_split_dataset
from ovd.data.masks import MASK_THRESHOLD, encode
from ovd.evaluation import evaluate_detections
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.utils.io import write_json
from ovd.vlm.text import TextSource, text_adapter_of

_BOX_KEYS = ("AP", "AP50", "AP_base", "AP50_base", "AP_novel", "AP50_novel")
SUMMARY_KEYS = _BOX_KEYS + tuple("mask_" + k for k in _BOX_KEYS)  # mask keys only for a model with masks


def has_masks(model) -> bool:
    """Does ``model`` predict instance masks (torchvision's ``RoIHeads.has_mask``)?"""
    f = getattr(getattr(model, "roi_heads", None), "has_mask", None)
    return bool(f()) if callable(f) else False


def iou_types(model) -> str:
    """What ``model``'s detections are evaluated for: box AP, and mask AP when it has masks."""
    return "bbox,segm" if has_masks(model) else "bbox"


def load_val(cfg):
    """The val set (every box kept as written: evaluation GT) and its split."""
    return load_split_dataset(cfg.data, "val", need_split="test", why="its novel classes are what is measured")


@torch.no_grad()
def predict_dataset(model, dataset, class_ids: list[int], progress: bool = True, *, batch_size: int = 1,
                    workers: int = 0) -> list[dict]:  # fmt: skip
    """COCO result list of ``model`` on every image (dataset order); labels 1..C map back to
    ``class_ids``. Images are read by a ``DataLoader`` (``workers`` processes) and go through the
    detector ``batch_size`` at a time (``test.batch_size`` / ``test.workers``)."""
    model.eval()
    device = next(model.parameters()).device
    results = []
    loader = make_loader(ImageSet(dataset), workers=workers, batch_size=batch_size, device=device)
    bar = tqdm(total=len(dataset), desc="test", disable=not progress)
    for batch in loader:
        outs = model([im.to(device, non_blocking=True) for im, _ in batch])
        for (_, image_id), out in zip(batch, outs):
            segms = encode(out["masks"][:, 0] >= MASK_THRESHOLD) if "masks" in out else None
            for k, (b, s, lab) in enumerate(zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist())):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": class_ids[lab - 1],
                        "bbox": coco_bbox(b),
                        "score": round(s, 5),
                    }
                )
                if segms is not None:
                    results[-1]["segmentation"] = segms[k]
        bar.update(len(batch))
    bar.close()
    return results


class PeriodicEval:
    """Val AP (base + novel vocabulary) during training; the training vocabulary is put back after."""

    def __init__(self, cfg, text: TextSource, device):
        self.val, self.split = load_val(cfg)
        names = list(self.split.base_names) + list(self.split.novel_names)
        self.text = text.encode(names).to(device)
        self.ids = list(self.split.base_ids) + list(self.split.novel_ids)
        self.batch_size, self.workers = int(cfg.test.batch_size), int(cfg.test.workers)

    def __call__(self, model, train_text) -> dict:
        model.set_vocabulary(self.text)
        try:
            dets = predict_dataset(model, self.val, self.ids, progress=False, batch_size=self.batch_size,
                                   workers=self.workers)  # fmt: skip
        finally:
            model.set_vocabulary(train_text)
        m = evaluate_detections(self.val, dets, split=self.split, iou_type=iou_types(model))
        return {k: m[k] for k in SUMMARY_KEYS if k in m}


def run_test(cfg, ckpt: str, out: str | None = None, progress: bool = True) -> dict:
    """``ovd test``: detections of the val set over base + novel names (with masks, when the model
    has them), then ``ovd eval`` metrics (box, and mask AP for a model with masks)."""
    state = load_checkpoint(ckpt)
    val, split = load_val(cfg)
    text = TextSource(cfg.clip, text_adapter_of(cfg))
    names = list(split.base_names) + list(split.novel_names)
    model = model_from_checkpoint(state, ckpt)
    text.check_dim(int(state["meta"]["embed_dim"]), f"detector {ckpt}")
    model.set_vocabulary(text.encode(names))
    dets = predict_dataset(model, val, list(split.base_ids) + list(split.novel_ids), progress,
                           batch_size=int(cfg.test.batch_size), workers=int(cfg.test.workers))  # fmt: skip
    out_dir = Path(out) if out else Path(ckpt).parent
    # metrics.json describes detections.json: the old one goes first, so that a run killed between
    # the two writes leaves new detections without metrics, never beside the old metrics
    (out_dir / "metrics.json").unlink(missing_ok=True)
    write_json(out_dir / "detections.json", dets, indent=None)
    metrics = evaluate_detections(val, dets, split=split, iou_type=iou_types(model))
    write_json(out_dir / "metrics.json", metrics)
    return metrics
