"""Proposal miner (EZSD): CLIP, prompted with every class name (novel included), picks the regions
whose CLIP embeddings the detector will distil.

Per image: dense anchors (+ optional external proposals) → EZSD crops → (adapted) CLIP embeddings
→ class distribution over the vocabulary → objectness → NMS → drop boxes on base ground truth →
top-K with a weight. Because the vocabulary holds the novel names too, regions that look like a
novel object score high even though no annotation marks them — distillation is then not biased
towards base classes, which is the point.

Objectness choices:
  * ``entropy`` (EZSD): log C − H(p). Zero for a uniform distribution (background looks like
    nothing in particular), log C for a one-hot one; the weight is that divided by log C, in [0, 1].
  * ``max_prob``: max_c p_c (weight = the same).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes
from tqdm import tqdm

from ovd.data.boxes import coco_bbox, xywh_to_xyxy
from ovd.data.images import load_image
from ovd.data.loading import load_split_dataset
from ovd.data.validate import is_box, is_int
from ovd.errors import OvdError
from ovd.utils.io import read_json, remove_stale_temps, write_json
from ovd.utils.lock import OutputLock
from ovd.vlm.clip import clip_from_config

OBJECTNESS = ("entropy", "max_prob")


def dense_anchors(
    height: int, width: int, stride: int, scales: Sequence[float], ratios: Sequence[float], min_size: float = 4.0
) -> torch.Tensor:
    """Anchors (N, 4 xyxy) centred at ((i + 0.5) * stride, (j + 0.5) * stride) for every cell.

    An anchor of scale s and ratio r (= h / w) has area (s * stride)^2, so w = s * stride / sqrt(r)
    and h = s * stride * sqrt(r) (the mmdetection / EZSD convention). Anchors are clipped to the
    image; clipped boxes smaller than ``min_size`` and exact duplicates after clipping are removed.
    """
    if stride <= 0 or not scales or not ratios:
        raise OvdError("miner anchors need a positive stride and at least one scale and one ratio")
    ys = (torch.arange(math.ceil(height / stride), dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(math.ceil(width / stride), dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # (P, 2)
    sizes = []
    for s in scales:
        for r in ratios:
            side = float(s) * stride
            sizes.append((side / math.sqrt(r), side * math.sqrt(r)))
    wh = torch.tensor(sizes, dtype=torch.float32)  # (A, 2)
    half = wh[None] / 2
    boxes = torch.cat([centres[:, None] - half, centres[:, None] + half], dim=2).reshape(-1, 4)
    boxes = clip_boxes_to_image(boxes, (height, width))
    boxes = boxes[remove_small_boxes(boxes, min_size)]
    return torch.unique(boxes, dim=0)


def objectness(probs: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    """Objectness in [0, 1] of per-box class distributions ``probs`` (N, C)."""
    if kind == "entropy":
        c = probs.shape[1]
        if c < 2:
            raise OvdError("entropy objectness needs a vocabulary of at least 2 classes")
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
        return ((math.log(c) - ent) / math.log(c)).clamp(0.0, 1.0)
    if kind == "max_prob":
        return probs.max(dim=1).values
    raise OvdError(f"unknown miner.objectness '{kind}' (choose from {', '.join(OBJECTNESS)})")


def filter_base_overlap(boxes: torch.Tensor, base_gt: torch.Tensor, iou_thr: float) -> torch.Tensor:
    """Indices of ``boxes`` whose IoU with every base GT box is <= ``iou_thr``."""
    if len(base_gt) == 0 or len(boxes) == 0:
        return torch.arange(len(boxes))
    return torch.nonzero(box_iou(boxes, base_gt).amax(dim=1) <= iou_thr).flatten()


def gt_boxes_of(rec: dict, cat_ids: set[int]) -> torch.Tensor:
    """(N, 4) xyxy GT boxes of a dataset record whose category is in ``cat_ids`` (e.g. the base classes)."""
    boxes = [b for b, c in zip(rec["boxes"], rec["labels"]) if c in cat_ids]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def candidate_boxes(
    height: int, width: int, m, base_gt: torch.Tensor | None = None, extra_boxes: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense anchors (+ external boxes), minus those overlapping base GT above ``m.base_iou_thr``.

    Base-GT filtering happens before CLIP sees anything: no encoder work on boxes that would be
    dropped anyway, and a confident base box cannot suppress a neighbouring novel one in the NMS.
    """
    cand = dense_anchors(height, width, m.stride, list(m.scales), list(m.ratios), m.min_size)
    if extra_boxes is not None and len(extra_boxes):
        extra = clip_boxes_to_image(extra_boxes.float(), (height, width))
        cand = torch.cat([cand, extra[remove_small_boxes(extra, m.min_size)]])
    if base_gt is not None and len(base_gt):
        cand = cand[filter_base_overlap(cand, base_gt, m.base_iou_thr)]
    return cand


def select(
    cand: torch.Tensor,
    emb: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    m,
    bg_text: torch.Tensor | None = None,
) -> dict:
    """Class distribution over the vocabulary → objectness → NMS → top-K.

    With background prompts (``bg_text``, e.g. "a striped pattern"), the softmax runs over
    classes + background; objectness is taken on the renormalised class part and multiplied by
    the class mass 1 − p(background), so a crop that looks most like stuff scores low even if its
    class distribution happens to be peaked.
    """
    if len(cand) == 0:
        return {"boxes": cand, "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    logits = logit_scale * emb @ text.T
    if bg_text is not None and len(bg_text):
        full = torch.cat([logits, logit_scale * emb @ bg_text.T], dim=1).softmax(dim=1)
        mass = full[:, : text.shape[0]].sum(dim=1, keepdim=True)
        probs = full[:, : text.shape[0]] / mass
        score = objectness(probs, m.objectness) * mass.squeeze(1)
    else:
        probs = logits.softmax(dim=1)
        score = objectness(probs, m.objectness)
    keep = nms(cand, score, m.nms_thr)[: m.topk]
    return {"boxes": cand[keep], "scores": score[keep], "labels": probs[keep].argmax(dim=1)}


def mine_image(
    clip,
    image: torch.Tensor,
    text: torch.Tensor,
    m,
    base_gt: torch.Tensor | None = None,
    extra_boxes: torch.Tensor | None = None,
    encode=None,
    bg_text: torch.Tensor | None = None,
) -> dict:
    """Mine one image. ``text``: (C, D) unit text embeddings of the vocabulary; ``m``: miner config.

    ``encode(image, boxes) -> (N, D)`` defaults to the fast path (:meth:`ClipModel.encode_boxes`);
    the benchmark passes the naive per-crop path to compare the two on identical boxes.
    """
    cand = candidate_boxes(image.shape[-2], image.shape[-1], m, base_gt, extra_boxes)
    emb = (encode or (lambda im, b: clip.encode_boxes(im, b, m.batch_size)))(image, cand) if len(cand) else None
    return select(cand, emb, text, clip.model.logit_scale.exp().item(), m, bg_text)


def run_mine(cfg, progress: bool = True) -> dict:
    """``ovd mine``: mined proposals for every image of ``cfg.data.train_json`` → ``cfg.miner.out``.

    One writer per output file (a lock beside it); the proposals are written atomically, then the
    report, so a reader sees the old proposals or the new ones, never part of them."""
    out = Path(cfg.miner.out)
    with OutputLock(out.with_name(f".{out.name}.lock"), f"proposals file {out}"):
        remove_stale_temps(out.parent, out.name)
        remove_stale_temps(out.parent, out.with_suffix(".report.json").name)
        return _run_mine(cfg, progress)


def _run_mine(cfg, progress: bool = True) -> dict:
    m = cfg.miner
    if m.objectness not in OBJECTNESS:
        raise OvdError(f"unknown miner.objectness '{m.objectness}' (choose from {', '.join(OBJECTNESS)})")
    train, split = load_split_dataset(
        cfg.data, need_split="mine", why="its base and novel names are the miner's vocabulary"
    )
    vocab = {"all": list(split.base_names) + list(split.novel_names), "base": list(split.base_names)}.get(m.vocabulary)
    if vocab is None:
        raise OvdError(f"unknown miner.vocabulary '{m.vocabulary}' (all: base + novel names, base: base names only)")
    name_to_id = {c["name"]: c["id"] for c in train.categories}
    adapter = cfg.adapter.out if cfg.adapter.enabled else None
    clip = clip_from_config(cfg.clip, adapter)
    text = clip.encode_text(vocab, list(cfg.clip.templates))
    bg_text = clip.encode_text(list(m.background_prompts), list(cfg.clip.templates)) if m.background_prompts else None
    extra = _read_external_proposals(m.external_proposals, set(train.image_ids)) if m.external_proposals else {}
    base_ids = set(split.base_ids)
    results = []
    t0 = time.time()
    for i in tqdm(range(len(train)), desc="mine proposals", disable=not progress):
        rec = train.record(i)
        image = load_image(rec["path"])
        out = mine_image(clip, image, text, m, gt_boxes_of(rec, base_ids), extra.get(rec["image_id"]), bg_text=bg_text)
        for b, s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            results.append(
                {
                    "image_id": rec["image_id"],
                    "bbox": coco_bbox(b),
                    "score": round(s, 5),
                    "weight": round(s, 5),
                    "category_id": name_to_id[vocab[lab]],
                    "category_name": vocab[lab],
                }
            )
    seconds = time.time() - t0
    report_path = Path(m.out).with_suffix(".report.json")
    report_path.unlink(missing_ok=True)  # the report describes the proposals: never leave an old one beside new ones
    write_json(m.out, results, indent=None)
    report = {
        "out": str(m.out),
        "images": len(train),
        "proposals": len(results),
        "seconds": round(seconds, 1),
        "vocabulary": m.vocabulary,
        "objectness": m.objectness,
        "clip": clip.source,
        "adapter": str(adapter) if adapter else None,
    }
    write_json(report_path, report)
    return report


def _read_external_proposals(path: str, image_ids: set[int]) -> dict[int, torch.Tensor]:
    """External proposals: a JSON list of {image_id, bbox xywh} (e.g. an RPN's output)."""
    data = read_json(path, "external proposals file")
    if not isinstance(data, list):
        raise OvdError(f"{path}: external proposals must be a JSON list of {{image_id, bbox}}")
    out: dict[int, list] = {}
    for i, d in enumerate(data):
        if not isinstance(d, dict) or not is_int(d.get("image_id")) or d["image_id"] not in image_ids:
            raise OvdError(f"{path}: [{i}] has no image_id of the train set")
        bb = d.get("bbox")
        if not is_box(bb):
            raise OvdError(f"{path}: [{i}]: 'bbox' must be 4 numbers [x, y, w, h]")
        out.setdefault(d["image_id"], []).append(xywh_to_xyxy(bb))
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}


def load_proposals(path: str | Path) -> dict[int, dict]:
    """Mined proposals JSON → {image_id: {"boxes" (N, 4 xyxy), "weights" (N,)}}."""
    data = read_json(path, "proposals file")
    if not isinstance(data, list):
        raise OvdError(f"{path}: proposals must be a JSON list of {{image_id, bbox, score, weight}}")
    out: dict[int, list] = {}
    for i, d in enumerate(data):
        try:
            out.setdefault(int(d["image_id"]), []).append(
                (xywh_to_xyxy(d["bbox"]), float(d.get("weight", d.get("score", 1.0))))
            )
        except (KeyError, TypeError, ValueError):
            raise OvdError(f"{path}: [{i}] needs image_id, bbox [x, y, w, h] and weight") from None
    return {
        k: {"boxes": torch.tensor([b for b, _ in v], dtype=torch.float32), "weights": torch.tensor([w for _, w in v])}
        for k, v in out.items()
    }
