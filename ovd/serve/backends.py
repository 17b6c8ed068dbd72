"""What ``ovd serve`` runs a request on: a PyTorch checkpoint or an open ONNX export.

Both backends answer ``detect(image, names, score_thr)`` with the ``Detector.predict`` dictionary
(boxes, scores, names, and masks when the model gives them) and are called from one worker thread
only (see :mod:`ovd.serve.app`): a request's vocabulary is set and used with no other request in
between, so concurrent requests never see each other's classes.

Text embeddings are cached per vocabulary by :class:`~ovd.vlm.clip.ClipModel` (bounded, least
recently used dropped): a class list seen before costs no text-tower call; ``text_tower_calls``
counts the ones that did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ovd.engine.export import onnx_session
from ovd.engine.export_open import IMAGE_INPUT, TEXT_INPUT, load_open_vocabulary, read_open_metadata
from ovd.engine.predictor import Detector
from ovd.errors import OvdError
from ovd.vlm.clip import ClipModel, tokenizer_clean
from ovd.vlm.vocab import parse_classes, read_classes_file, text_fingerprint


def _default_vocabulary(classes_file, text_embeddings) -> tuple[str, object] | None:
    if classes_file is not None and text_embeddings is not None:
        raise OvdError("give at most one of --classes-file and --text-embeddings (the default vocabulary)")
    if classes_file is not None:
        return "names", read_classes_file(classes_file)
    if text_embeddings is not None:
        if not Path(text_embeddings).is_file():
            raise OvdError(f"text embeddings file not found: {text_embeddings}")
        return "file", Path(text_embeddings)
    return None


class TorchBackend:
    """A trained checkpoint through :class:`~ovd.engine.predictor.Detector`."""

    kind = "pytorch"

    def __init__(self, detector: Detector, default: tuple[str, object] | None = None, source: str = "detector"):
        self.det = detector
        self.source = source
        self.default_names: list[str] | None = None
        self._default_file: Path | None = None
        if default is not None:
            kind, value = default
            if kind == "file":
                self._default_file = Path(value)
                self.default_names = list(self.det.set_classes_from_file(value))
            else:
                self.default_names = list(self.det.set_classes(value))

    @classmethod
    def from_checkpoint(cls, ckpt, classes_file=None, text_embeddings=None, device: str = "cpu") -> TorchBackend:
        default = _default_vocabulary(classes_file, text_embeddings)
        file = default[1] if default and default[0] == "file" else None
        det = Detector.from_checkpoint(ckpt, device=device, text_embeddings=file)
        return cls(det, default, source=str(ckpt))

    def parse(self, text: str) -> list[str]:
        clip = self.det._clip  # the tokenizer's reading of names, when the CLIP is already loaded
        return parse_classes(text, tokenizer_clean(clip.tokenizer) if clip is not None else None)

    @property
    def text_tower_calls(self) -> int:
        return int(getattr(self.det._clip, "text_tower_calls", 0))

    def clip_fingerprint(self) -> str | None:
        return self.det._clip_identity()[0]

    def detect(self, image: torch.Tensor, names: list[str] | None, score_thr: float) -> dict:
        if names is None:
            if self.default_names is None:
                raise OvdError("no classes given and this server has no default vocabulary: send 'classes'")
            if self._default_file is not None:
                if self.det.vocabulary_file != self._default_file:  # a file is re-read only after other names
                    self.det.set_classes_from_file(self._default_file)
            else:
                self.det.set_classes(self.default_names)
        else:
            self.det.set_classes(names)
        return self.det.predict(image, score_thr=score_thr)


class OnnxBackend:
    """An open export (``ovd export --open``) in onnxruntime; names are embedded with the CLIP its
    metadata records (loaded on first use), a stored vocabulary is used as stored."""

    kind = "onnx"

    def __init__(self, path, classes_file=None, text_embeddings=None, threads: int = 1):

        self.source = str(path)
        self.meta = read_open_metadata(path)
        self.sess = onnx_session(path, threads=threads)
        self._inputs = (IMAGE_INPUT, TEXT_INPUT)
        self.templates = list(self.meta["templates"]) or ["a photo of a {}."]
        self._clip: ClipModel | None = None
        self.default_names: list[str] | None = None
        self._default_emb: torch.Tensor | None = None
        default = _default_vocabulary(classes_file, text_embeddings)
        if default is not None:
            kind, value = default
            if kind == "file":
                vocab = load_open_vocabulary(value, self.meta, f"the exported detector {path}")
                self.default_names, self._default_emb = list(vocab.names), vocab.embeddings
            else:
                self.default_names = list(value)
                self._default_emb = self.clip.encode_text(self.default_names, self.templates)

    @property
    def clip(self) -> ClipModel:
        if self._clip is None:
            spec = self.meta.get("clip_spec") or {}
            if not spec.get("model"):
                raise OvdError(f"{self.source} records no CLIP to embed class names: only its default vocabulary "
                               "can be used (start the server with --text-embeddings)")  # fmt: skip
            clip = ClipModel.load(spec["model"], spec.get("pretrained") or None)
            clip.check_dim(self.meta["embed_dim"], f"exported detector {self.source}")
            fp = self.meta.get("clip_fingerprint")
            if fp and text_fingerprint(clip) != fp:
                raise OvdError(f"the CLIP recorded in {self.source} ({spec['model']}) is not the one the detector "
                               "was trained with (another fingerprint): its weights changed")  # fmt: skip
            self._clip = clip
        return self._clip

    def parse(self, text: str) -> list[str]:
        return parse_classes(text, tokenizer_clean(self._clip.tokenizer) if self._clip is not None else None)

    @property
    def text_tower_calls(self) -> int:
        return int(getattr(self._clip, "text_tower_calls", 0))

    def clip_fingerprint(self) -> str | None:
        return self.meta.get("clip_fingerprint") or None

    def detect(self, image: torch.Tensor, names: list[str] | None, score_thr: float) -> dict:
        if not 0.0 <= score_thr <= 1.0:
            raise OvdError(f"score threshold must be in [0, 1], got {score_thr}")
        if names is None:
            if self.default_names is None:
                raise OvdError("no classes given and this server has no default vocabulary: send 'classes'")
            names, emb = self.default_names, self._default_emb
        else:
            emb = self.clip.encode_text(names, self.templates)
        feed = {self._inputs[0]: image.float().numpy(), self._inputs[1]: emb.float().numpy()}
        outs = self.sess.run(None, feed)
        boxes, scores, labels = outs[:3]
        keep = scores >= score_thr
        order = np.argsort(-scores[keep], kind="stable")  # highest first, ties in the graph's order
        boxes, scores, labels = boxes[keep][order], scores[keep][order], labels[keep][order]
        out = {"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
               "labels": torch.from_numpy(labels), "names": [names[int(k)] for k in labels]}  # fmt: skip
        if len(outs) > 3:  # an export of a detector with a mask head: (M, 1, H, W) probabilities
            out["masks"] = torch.from_numpy(outs[3][keep][order])
        return out


def build_backend(ckpt=None, onnx=None, classes_file=None, text_embeddings=None):
    """The backend ``ovd serve`` options describe: exactly one of a checkpoint and ``--onnx``."""
    if (ckpt is None) == (onnx is None):
        raise OvdError("give a checkpoint (CKPT) or --onnx MODEL, exactly one")
    if onnx is not None:
        if not Path(onnx).is_file():
            raise OvdError(f"ONNX model not found: {onnx}")
        return OnnxBackend(onnx, classes_file, text_embeddings, threads=max(1, torch.get_num_threads()))
    if not Path(ckpt).is_file():
        raise OvdError(f"checkpoint not found: {ckpt}")
    return TorchBackend.from_checkpoint(ckpt, classes_file, text_embeddings)


__all__ = ["OnnxBackend", "TorchBackend", "build_backend"]
