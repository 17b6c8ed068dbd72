"""Semantic-aware box regression (EZSD): class-agnostic deltas steered by the class's text embedding.

The regressor sees the box feature concatenated with the text embedding of the RoI's class: the
assigned class in training, the predicted class at inference. Novel classes therefore get boxes
regressed with their own text, not a per-class head they never trained.
"""

from __future__ import annotations

import torch
from torch import nn


class SemanticBoxRegressor(nn.Module):
    """Class-agnostic box deltas from [box feature, text embedding of the class] (EZSD).

    With ``semantic=False`` it is a plain class-agnostic regressor (the ablation without it).
    """

    def __init__(self, in_features: int, embed_dim: int, semantic: bool = True):
        super().__init__()
        self.semantic = semantic
        self.embed_dim = embed_dim
        self.fc = nn.Linear(in_features + (embed_dim if semantic else 0), 4)

    def forward(self, x: torch.Tensor, class_text: torch.Tensor | None) -> torch.Tensor:
        """(N, 4) deltas of box features ``x`` (N, in_features); ``class_text`` (N, D) or None (zeros)."""
        if self.semantic:
            if class_text is None:
                class_text = x.new_zeros((x.shape[0], self.embed_dim))
            x = torch.cat([x, class_text.to(x.dtype)], dim=1)
        return self.fc(x)


def class_text(text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Text embedding per RoI of ``labels`` in torchvision's convention: 0 = background → zeros,
    k ≥ 1 → ``text[k - 1]`` (``text``: the (C, D) vocabulary)."""
    out = text.new_zeros((labels.shape[0], text.shape[1]))
    fg = labels > 0
    out[fg] = text[labels[fg] - 1]
    return out
