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

from ovd.data.images import load_image, pil_to_tensor
from ovd.data.masks import MASK_THRESHOLD
from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.vlm.adapter_file import apply_adapter
from ovd.vlm.clip import ClipModel, tokenizer_clean
from ovd.vlm.vocab import check_vocabulary_clip, load_vocabulary, parse_classes, text_fingerprint


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
    """A trained open-vocabulary detector plus the CLIP text tower that turns names into classes.

    The text tower is loaded on first use: a detector prompted only with a stored vocabulary
    (:meth:`set_classes_from_file`, ``from_checkpoint(..., text_embeddings=F)``) never loads it."""

    def __init__(
        self,
        model: torch.nn.Module,
        clip,
        templates: Sequence[str],
        meta: dict | None = None,
        clip_loader=None,
        name: str = "detector",
    ):
        self.model = model.eval()
        self._clip = clip
        self._clip_loader = clip_loader
        self.templates = list(templates)
        self.meta = meta or {}
        self.name = name
        self.classes: list[str] = []
        self.vocabulary_file: Path | None = None  # the stored vocabulary in use, if any
        self._vocab_key: tuple | None = None

    @property
    def clip(self):
        """The CLIP whose text tower embeds class names (loaded on first use)."""
        if self._clip is None:
            if self._clip_loader is None:
                raise OvdError(f"{self.name} has no CLIP model to embed class names: pass clip= (a ClipModel)")
            self._clip = self._clip_loader()
        return self._clip

    @property
    def embed_dim(self) -> int:
        return int(self.meta.get("embed_dim") or self.model.roi_heads.classifier.embed_dim)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        clip=None,
        device: str = "cpu",
        text_embeddings: str | os.PathLike | None = None,
    ) -> Detector:
        """Load ``path`` (an ``ovd train`` checkpoint). ``clip``: a ClipModel, or None for the one the
        checkpoint was trained with (its open_clip model + weights, recorded at training time).
        ``text_embeddings``: a stored vocabulary (``ovd vocab embed``) to detect from the start; the
        CLIP is then not loaded until class names need embedding. Without it the detector starts
        with the base classes it was trained on."""
        state = load_checkpoint(path)
        meta = state["meta"]
        model = model_from_checkpoint(state, path).to(device)
        dim = int(meta["embed_dim"])
        spec = meta.get("clip_spec")

        def load_clip():
            if not spec:
                raise OvdError(f"{path} records no CLIP model: pass clip= (a ClipModel) explicitly")
            c = ClipModel.load(spec["model"], spec["pretrained"] or None, device=device)
            c.check_dim(dim, f"detector {path}")
            if spec.get("adapter"):  # trained on text embeddings of an adapted text tower
                apply_adapter(c, spec["adapter"])
            return c

        if clip is not None:
            clip.check_dim(dim, f"detector {path}")
        det = cls(model, clip, meta.get("templates") or ["a photo of a {}."], meta, load_clip, f"detector {path}")
        if text_embeddings is not None:
            det.set_classes_from_file(text_embeddings)
        else:
            det.clip  # noqa: B018 - load (and check) the CLIP now: a wrong one fails here, not at the first image
            if meta.get("base_names"):
                det.set_classes(meta["base_names"])
        return det

    def set_classes(self, classes: str | Sequence[str]) -> list[str]:
        """Detect these classes from now on (names → CLIP text embeddings → classifier)."""
        tok = getattr(self.clip, "tokenizer", None)
        names = parse_classes(classes, tokenizer_clean(tok) if tok is not None else None)
        key = ("names", tuple(names), tuple(self.templates))
        if key != self._vocab_key:
            self.model.set_vocabulary(self.clip.encode_text(names, self.templates))
            self.classes, self.vocabulary_file, self._vocab_key = names, None, key
        return names

    def set_classes_from_file(self, path: str | os.PathLike) -> list[str]:
        """Detect the classes of a stored vocabulary (``ovd vocab embed`` / ``clip.text_embeddings``
        format) from now on, with its embeddings as stored: no text tower runs. A file of another
        dimension, or recording another CLIP than the detector's, is one :class:`OvdError`."""
        vocab = load_vocabulary(path)
        fingerprint, source = self._clip_identity()
        check_vocabulary_clip(vocab, self.embed_dim, fingerprint, source, self.name)
        self.model.set_vocabulary(vocab.embeddings)
        self.classes, self.vocabulary_file = list(vocab.names), Path(path)
        self._vocab_key = ("file", str(Path(path).resolve()))
        return self.classes

    def _clip_identity(self) -> tuple[str | None, str | None]:
        """(text fingerprint, source) of the CLIP this detector was trained with: the checkpoint's
        record first (its region embeddings live in that CLIP's space), else the loaded CLIP's."""
        src = str(self.meta.get("clip") or "")
        inputs = self.meta.get("inputs") if isinstance(self.meta.get("inputs"), dict) else {}
        if src.startswith("text-embeddings:"):  # trained from a stored vocabulary: that file's CLIP
            try:
                v = load_vocabulary(src[len("text-embeddings:") :])
                return v.clip_fingerprint, v.clip_source
            except OvdError:
                pass
        elif inputs.get("clip.fingerprint"):
            return str(inputs["clip.fingerprint"]), inputs.get("clip.source")
        if self._clip is not None:
            return text_fingerprint(self._clip), self._clip.source
        return None, None

    @torch.no_grad()
    def predict(self, image, classes: str | Sequence[str] | None = None, score_thr: float = 0.05) -> dict:
        """Detections of one image: ``boxes`` (N, 4) xyxy in input pixels, ``scores``, ``labels``
        (0-based index into ``names``) and ``names`` (class name per box), highest score first
        (ties keep the model's order, as ``ovd test`` writes them). A detector with a mask head
        also gives ``masks``: (N, H, W) bool, each detection's mask in the input image's size."""
        return self.predict_batch([image], classes, score_thr)[0]

    @torch.no_grad()
    def predict_batch(
        self, images: Sequence, classes: str | Sequence[str] | None = None, score_thr: float = 0.05
    ) -> list[dict]:
        """:meth:`predict` of several images in one detector forward: one dict per image, in order.
        torchvision pads the images of a batch to one size, so a score may differ from a one-image
        call in its last digits."""
        if classes is not None:
            self.set_classes(classes)
        if not self.classes:
            raise OvdError(f"{self.name} has no vocabulary yet: pass classes=[...] or call set_classes_from_file")
        if not 0.0 <= score_thr <= 1.0:
            raise OvdError(f"score threshold must be in [0, 1], got {score_thr}")
        device = next(self.model.parameters()).device
        results = []
        for out in self.model([as_image_tensor(image).to(device, non_blocking=True) for image in images]):
            keep = out["scores"] >= score_thr
            order = torch.sort(out["scores"][keep], descending=True, stable=True).indices
            boxes, scores = out["boxes"][keep][order].cpu(), out["scores"][keep][order].cpu()
            labels = (out["labels"][keep][order] - 1).cpu()
            pred = {"boxes": boxes, "scores": scores, "labels": labels, "names": [self.classes[i] for i in labels]}
            if "masks" in out:  # (N, 1, H, W) probabilities pasted into the image, as torchvision's Mask R-CNN
                pred["masks"] = (out["masks"][keep][order][:, 0] >= MASK_THRESHOLD).cpu()
            results.append(pred)
        return results
