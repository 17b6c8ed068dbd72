"""Readable pictures of detections: upscaled, one colour per class, labels that do not overlap.

A 160-px mini-world scene drawn at its own size has labels taller than its objects, written over
each other. Here the image is first enlarged (nearest neighbour, whole factor, so pixels stay
sharp) until its short side is at least ``min_side``; boxes (and masks, when the prediction has
them) are drawn with torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks``; the
labels are placed by :func:`place_labels`, by hand: torchvision writes each label at its own box's
corner and has no notion of the other labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

# distinct colours (Sasha Trubetskoy's list), class k gets PALETTE[k % len]; the page uses the same
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#469990", "#9a6324", "#800000", "#000075"]  # fmt: skip


def class_colour(label: int) -> str:
    return PALETTE[int(label) % len(PALETTE)]


def upscale_factor(height: int, width: int, min_side: int) -> int:
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font (FreeType)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes: list[list[float]], sizes: list[tuple[int, int]], width: int, height: int) -> list[tuple]:
    """Top-left corners for labels of ``sizes`` (w, h), one per box, in order (put the most important
    first: it gets the best place). Each label tries, in turn: above its box's top-left corner,
    inside it, below the box, above its top-right corner; the first place inside the image that
    overlaps no label already placed wins. If none is free, the label moves down from the first
    place until it is free (or reaches the bottom)."""
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        candidates = [(x1, y1 - h), (x1, y1), (x1, y2), (x2 - w, y1 - h)]
        spot = None
        for cx, cy in candidates:
            cx = min(max(0.0, cx), max(0.0, width - w))
            if cy < 0 or cy + h > height:
                continue
            rect = (cx, cy, cx + w, cy + h)
            if not any(_overlaps(rect, r) for r in placed):
                spot = rect
                break
        if spot is None:
            cx = min(max(0.0, x1), max(0.0, width - w))
            cy = min(max(0.0, y1 - h), max(0.0, height - h))
            rect = (cx, cy, cx + w, cy + h)
            for _ in range(len(placed) + 1):
                hit = next((r for r in placed if _overlaps(rect, r)), None)
                if hit is None or hit[3] + h > height:
                    break
                rect = (cx, hit[3], cx + w, hit[3] + h)
            spot = rect
        placed.append(spot)
        out.append(spot[:2])
    return out


def draw_detections(
    image: torch.Tensor,
    pred: dict,
    min_side: int = 480,
    width: int = 3,
    font_size: int = 14,
    mask_alpha: float = 0.4,
) -> torch.Tensor:
    """uint8 (3, H', W') picture of ``pred`` (``Detector.predict`` output: boxes, scores, labels,
    names; ``masks`` optional) on ``image`` ((3, H, W) float in [0, 1] or uint8), enlarged by a whole
    factor to a short side of at least ``min_side`` (0: as is). Colour by class (``labels``)."""
    img = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    h, w = img.shape[-2:]
    k = upscale_factor(h, w, min_side) if min_side else 1
    if k > 1:
        img = img.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)
    boxes = pred["boxes"].float() * k
    n = len(boxes)
    if n == 0:
        return img
    labels = [int(v) for v in pred["labels"]]
    colours = [class_colour(lab) for lab in labels]
    masks = pred.get("masks")
    if masks is not None and len(masks) == n:
        m = masks.float()
        m = m if m.ndim == 4 else m[:, None]
        if k > 1:
            m = F.interpolate(m, scale_factor=k, mode="nearest")
        img = draw_segmentation_masks(img, m[:, 0] > 0.5, alpha=mask_alpha, colors=colours)
    order = torch.argsort(pred["scores"], descending=False, stable=True).tolist()  # best drawn last, on top
    img = draw_bounding_boxes(img, boxes[order], colors=[colours[i] for i in order], width=width)
    # labels: best first gets the best place
    best = order[::-1]
    font = _font(font_size)
    texts = [f"{pred['names'][i]} {float(pred['scores'][i]):.2f}" for i in best]
    pad = 2
    sizes = []
    for t in texts:
        x0, y0, x1, y1 = font.getbbox(t)
        sizes.append((int(x1 - min(0, x0)) + 2 * pad, int(y1) + 2 * pad))
    spots = place_labels([boxes[i].tolist() for i in best], sizes, img.shape[-1], img.shape[-2])
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    for i, t, (x, y), (tw, th) in zip(best, texts, spots, sizes):
        draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=colours[i])
        draw.text((x + pad, y + pad), t, fill="white", font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
