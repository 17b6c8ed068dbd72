"""Zero-shot classifier: region embeddings scored against text embeddings of any vocabulary.

The shape follows Detic's ``ZeroShotClassifier.forward(x, classifier=None)``: the vocabulary is
data (a (C, D) tensor of unit text embeddings), set once with :meth:`set_vocabulary` or passed per
call, so a trained detector can be prompted with new class names without retraining.

Logits follow torchvision's label convention — column 0 is background, columns 1..C the
vocabulary — and are ``scale * cos(region, ·)`` against a learned background embedding and the
frozen text embeddings (EZSD: cosine classifier, learnable temperature, background vector).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ovd.errors import OvdError


class ZeroShotClassifier(nn.Module):
    def __init__(
        self,
        in_features: int,
        embed_dim: int,
        init_scale: float = 1 / 0.07,
        max_scale: float = 100.0,
        unit_background: bool = True,
    ):
        super().__init__()
        # unit_background=False (EZSD's code): the background vector is scored unnormalised, so its
        # learnt length sets how readily a region is called background, independent of the classes
        self.unit_background = unit_background
        self.embed_dim = embed_dim
        self.proj = nn.Linear(in_features, embed_dim)  # box-head feature → CLIP space
        self.background = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.max_scale = max_scale
        self.register_buffer("text", torch.zeros(0, embed_dim), persistent=False)

    def set_vocabulary(self, text: torch.Tensor) -> None:
        """(C, D) text embeddings of the classes to detect (normalised here)."""
        if text.ndim != 2 or text.shape[1] != self.embed_dim:
            raise OvdError(
                f"text embeddings of shape {tuple(text.shape)} do not fit a detector with {self.embed_dim}-d "
                f"region embeddings: they were made with a different CLIP"
            )
        if text.shape[0] == 0:
            raise OvdError("empty class vocabulary: give at least one class name")
        self.text = F.normalize(text.detach().float(), dim=-1).to(self.background.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit region embeddings (N, D) of box-head features (N, in_features)."""
        return F.normalize(self.proj(x), dim=-1)

    def forward(self, emb: torch.Tensor, classifier: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, 1 + C) of unit region embeddings ``emb``; ``classifier`` overrides the vocabulary."""
        text = self.text if classifier is None else F.normalize(classifier.float(), dim=-1).to(emb.device)
        if text.shape[0] == 0:
            raise OvdError("the detector has no vocabulary: call set_vocabulary(text embeddings) first")
        bg = F.normalize(self.background, dim=0) if self.unit_background else self.background
        weights = torch.cat([bg[None], text], dim=0)
        return self.logit_scale.exp().clamp(max=self.max_scale) * emb @ weights.T
