"""Prompting a trained detector with any class names: the ``Detector`` API behind ``ovd detect``.

    det = Detector.from_checkpoint("work_dirs/mini-smoke/train/final.pt")
    out = det.predict("scene.png", classes=["red circle", "blue star"])
    out["boxes"], out["scores"], out["names"]

The vocabulary is data: ``classes`` are turned into CLIP text embeddings (cached per vocabulary by
:class:`~ovd.vlm.clip.ClipModel`) and handed to the zero-shot classifier; nothing is retrained.
The CLIP used for the text is the one recorded in the checkpoint (or one passed in).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from ovd.data.boxes import coco_bbox
from ovd.data.images import load_image, pil_to_tensor
from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.utils.io import atomic_path, write_json
from ovd.vlm.clip import ClipModel, describe_clash, tokenizer_clean, vocabulary_clash


def parse_classes(classes: str | Sequence[str], clean=None) -> list[str]:
    """Class names from a list or a comma-separated string; empty or duplicate names are errors.

    Duplicates are found the way the CLIP tokenizer reads names (``clean``: its cleaning function,
    default open_clip's: lower-cased, whitespace collapsed), so "red square" and "Red Square" —
    one text embedding — are refused rather than silently becoming two identical classes."""
    try:
        names = classes.split(",") if isinstance(classes, str) else list(classes)
    except TypeError:
        names = None
    if names is None or not all(isinstance(c, str) for c in names):
        raise OvdError(f"classes must be a comma-separated string or a list of strings, got {classes!r:.80}")
    names = [c.strip() for c in names]
    names = [c for c in names if c]
    if not names:
        raise OvdError("empty class list: give at least one class name, e.g. --classes 'red circle,blue star'")
    clash = vocabulary_clash(names, clean)
    if clash:
        raise OvdError(f"duplicate class names: {describe_clash(clash)}")
    return names


def as_image_tensor(image) -> torch.Tensor:
    """A path, PIL image, HxWx3 uint8 array or 3xHxW float tensor in [0, 1] → 3xHxW float tensor."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_tensor(image, "PIL image")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise OvdError(f"expected an HxWx3 image array, got shape {image.shape}")
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / scale
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise OvdError(f"expected a 3xHxW image tensor, got shape {tuple(image.shape)}")
        return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    raise OvdError(f"cannot use a {type(image).__name__} as an image (path, PIL image, array or tensor)")


class Detector:
    """A trained open-vocabulary detector plus the CLIP text tower that turns names into classes."""

    def __init__(self, model: torch.nn.Module, clip, templates: Sequence[str], meta: dict | None = None):
        self.model = model.eval()
        self.clip = clip
        self.templates = list(templates)
        self.meta = meta or {}
        self.classes: list[str] = []

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, clip=None, device: str = "cpu") -> Detector:
        """Load ``path`` (an ``ovd train`` checkpoint). ``clip``: a ClipModel, or None for the one the
        checkpoint was trained with (its open_clip model + weights, recorded at training time)."""
        state = load_checkpoint(path)
        meta = state["meta"]
        model = model_from_checkpoint(state, path).to(device)
        if clip is None:
            spec = meta.get("clip_spec")
            if not spec:
                raise OvdError(f"{path} records no CLIP model: pass clip= (a ClipModel) explicitly")
            clip = ClipModel.load(spec["model"], spec["pretrained"] or None, device=device)
        clip.check_dim(int(meta["embed_dim"]), f"detector {path}")
        det = cls(model, clip, meta.get("templates") or ["a photo of a {}."], meta)
        if meta.get("base_names"):
            det.set_classes(meta["base_names"])
        return det

    def set_classes(self, classes: str | Sequence[str]) -> list[str]:
        """Detect these classes from now on (names → CLIP text embeddings → classifier)."""
        tok = getattr(self.clip, "tokenizer", None)
        names = parse_classes(classes, tokenizer_clean(tok) if tok is not None else None)
        if names != self.classes:
            self.model.set_vocabulary(self.clip.encode_text(names, self.templates))
            self.classes = names
        return names

    @torch.no_grad()
    def predict(self, image, classes: str | Sequence[str] | None = None, score_thr: float = 0.05) -> dict:
        """Detections of one image: ``boxes`` (N, 4) xyxy in input pixels, ``scores``, ``labels``
        (0-based index into ``names``) and ``names`` (class name per box), highest score first."""
        if classes is not None:
            self.set_classes(classes)
        if not 0.0 <= score_thr <= 1.0:
            raise OvdError(f"score threshold must be in [0, 1], got {score_thr}")
        x = as_image_tensor(image).to(next(self.model.parameters()).device)
        out = self.model([x])[0]
        keep = out["scores"] >= score_thr
        order = out["scores"][keep].argsort(descending=True)
        boxes, scores = out["boxes"][keep][order].cpu(), out["scores"][keep][order].cpu()
        labels = (out["labels"][keep][order] - 1).cpu()
        return {"boxes": boxes, "scores": scores, "labels": labels, "names": [self.classes[i] for i in labels]}


def draw_detections(image: torch.Tensor, pred: dict, width: int = 2) -> torch.Tensor:
    """uint8 (3, H, W) image with labelled boxes (torchvision's ``draw_bounding_boxes``)."""
    img = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if len(pred["boxes"]) == 0:
        return img
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    labels = [f"{n} {s:.2f}" for n, s in zip(pred["names"], pred["scores"].tolist())]
    colors = [palette[int(k) % len(palette)] for k in pred["labels"]]
    return draw_bounding_boxes(img, pred["boxes"], labels=labels, colors=colors, width=width)


def run_detect(
    images: Sequence[str], ckpt: str, classes: str, score_thr: float = 0.3, out: str = "detections", clip=None
) -> list[dict]:
    """``ovd detect``: per image ``OUT/<stem>.json`` (boxes xywh, scores, names) and ``OUT/<stem>.png``."""
    names = parse_classes(classes)
    if not 0.0 <= score_thr <= 1.0:
        raise OvdError(f"score threshold must be in [0, 1], got {score_thr}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise OvdError(f"--out {out_dir} exists and is not a folder")
    paths = [Path(p) for p in images]
    if not paths:
        raise OvdError("no images given")
    for p in paths:  # fail before loading anything
        if not p.is_file():
            raise OvdError(f"image not found: {p}")
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise OvdError(f"several images share the name {dup[0]}: outputs would overwrite each other")
    pixels = [load_image(p) for p in paths]  # unreadable files fail here, before any output is written
    det = Detector.from_checkpoint(ckpt, clip=clip)
    det.set_classes(names)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OvdError(f"cannot create output folder {out_dir}: {e.strerror or e}") from None
    summary = []
    for p, img in zip(paths, pixels):
        pred = det.predict(img, score_thr=score_thr)
        rec = {
            "image": str(p),
            "width": int(img.shape[-1]),
            "height": int(img.shape[-2]),
            "classes": names,
            "detections": [
                {
                    "bbox": coco_bbox(box),
                    "score": round(s, 5),
                    "category_name": n,
                }
                for box, s, n in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["names"])
            ],
        }
        write_json(out_dir / f"{p.stem}.json", rec)
        drawn = draw_detections(img, pred)
        with atomic_path(out_dir / f"{p.stem}.png") as tmp:
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        summary.append({"image": str(p), "detections": len(rec["detections"]), "json": str(out_dir / f"{p.stem}.json")})
    return summary
