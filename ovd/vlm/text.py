"""Where a detector's class embeddings come from: the CLIP text tower, or a stored vocabulary file."""

from __future__ import annotations

from pathlib import Path

import torch

from ovd.errors import OvdError
from ovd.utils.io import file_sha1
from ovd.vlm.clip import clip_from_config
from ovd.vlm.vocab import check_vocabulary_clip, load_vocabulary, text_fingerprint


class TextSource:
    """Class names → unit text embeddings: the CLIP text tower, or a stored vocabulary file
    (``clip.text_embeddings``, made by :func:`ovd.vlm.clip.save_text_embeddings`; like Detic's
    zero-shot weight files, it spares loading CLIP just to embed a fixed vocabulary)."""

    def __init__(self, c, adapter: str | None = None):
        # adapter: an adapter file that adapted the text tower (adapter.text_tower; see
        # text_adapter_of), applied so the class embeddings come from the adapted tower
        self.adapter = adapter
        self.templates = list(c.templates)
        self.file = c.text_embeddings
        self._clip = None
        self.c = c
        if self.file:
            vocab = load_vocabulary(self.file)
            self.stored, self.names = vocab.embeddings, vocab.names
            self.embed_dim = int(self.stored.shape[1])
            if vocab.clip_fingerprint:  # the config's CLIP made the feature cache / the detector's space
                check_vocabulary_clip(vocab, self.clip.embed_dim, text_fingerprint(self.clip), self.clip.source,
                                      f"the config's CLIP (clip.model {c.model})")  # fmt: skip
            self.source = f"text-embeddings:{Path(self.file).resolve()}"
            self.fingerprint = file_sha1(self.file)[:16]  # the stored vectors themselves
        else:
            self.embed_dim = self.clip.embed_dim
            self.source = self.clip.source
            self.fingerprint = self.clip.fingerprint()  # the weights (see ClipModel.fingerprint)

    @property
    def clip(self):
        if self._clip is None:
            self._clip = clip_from_config(self.c, self.adapter)
        return self._clip

    def encode(self, names: list[str]) -> torch.Tensor:
        if not self.file:
            return self.clip.encode_text(names, self.templates)
        missing = [n for n in names if n not in self.names]
        if missing:
            raise OvdError(f"text embeddings {self.file} have no entry for: {', '.join(missing[:5])}")
        return self.stored[[self.names.index(n) for n in names]]

    def check_dim(self, dim: int, what: str) -> None:
        if dim != self.embed_dim:
            raise OvdError(
                f"{what} has {dim}-d embeddings but the text embeddings ({self.source}) are {self.embed_dim}-d: "
                f"they were made with a different CLIP"
            )


def text_adapter_of(cfg) -> str | None:
    """The adapter file whose text-tower LayerNorms every class text embedding must go through
    (``adapter.text_tower`` on an enabled adapter), else None: the text tower as pre-trained."""
    a = cfg.adapter
    return str(a.out) if a.enabled and a.text_tower else None


def clip_spec(c, adapter: str | None = None) -> dict:
    """The CLIP a detector's text embeddings come from, with local paths made absolute, so that
    ``Detector.from_checkpoint`` can prompt it from any working directory. ``adapter``: the
    text-adapting adapter file (:func:`text_adapter_of`), recorded only when there is one."""
    model, pretrained = c.model, c.pretrained
    if model.startswith("local-dir:"):
        model = "local-dir:" + str(Path(model[len("local-dir:") :]).resolve())
    elif Path(model).is_dir():
        model = str(Path(model).resolve())
    if pretrained and Path(pretrained).is_file():
        pretrained = str(Path(pretrained).resolve())
    spec = {"model": model, "pretrained": pretrained}
    return spec | {"adapter": str(Path(adapter).resolve())} if adapter else spec


def clip_source(c) -> str:
    """``ClipModel.source`` with local paths made absolute (the same CLIP however it is spelled)."""
    spec = clip_spec(c)
    if spec["model"].startswith("local-dir:"):
        return spec["model"]
    if Path(spec["model"]).is_dir():
        return f"local-dir:{spec['model']}"
    return f"{spec['model']}/{spec['pretrained'] or 'random-init'}"
