"""Distillation terms of the RoI head.

CLIP distillation (the card's "distillation"): the region embeddings of cached boxes (GT boxes and
mined proposals, extracted once by ``ovd extract``) are pulled towards the CLIP image embeddings of
the same crops by a weighted L1 between the L2-normalised vectors (ViLD / EZSD style). The cached
boxes travel in the target dicts under the three keys below; :class:`~ovd.modeling.detector.OVFasterRCNN`
resizes ``DISTILL_BOXES`` with the image like torchvision resizes ``boxes``.

Teacher distillation: RoIs fed to the head as already pooled features
(:class:`~ovd.modeling.roi_heads.ExtraRoIs`) may carry the outputs of a frozen teacher head for the
same features (e.g. the base model, for data-free replay of forged base-class RoI features); the
student's outputs are pulled towards them by :func:`teacher_losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovd.data.train_set import DISTILL_BOXES, DISTILL_EMBEDDINGS, DISTILL_KEYS, DISTILL_WEIGHTS  # noqa: F401
from ovd.errors import OvdError


def has_distill_targets(targets: list[dict] | None) -> bool:
    """True when there is at least one target dict and every one carries cached distillation boxes."""
    return targets is not None and len(targets) > 0 and all(DISTILL_BOXES in t for t in targets)


def distill_l1(emb: torch.Tensor, clip: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted L1 between unit region embeddings ``emb`` (K, D) and CLIP embeddings ``clip`` (K, D).

    ``clip`` is L2-normalised here; ``weights`` (K,) weight each box's summed absolute difference and
    the result is divided by their sum (0 when K == 0, never NaN).
    """
    clip = F.normalize(clip.to(emb.dtype), dim=-1)
    w = weights.to(emb.dtype)
    return (w[:, None] * (emb - clip).abs()).sum() / w.sum().clamp(min=1e-6)


def distill_loss(emb: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """:func:`distill_l1` of the region embeddings of all images' cached boxes (concatenated in image
    order, as pooled) against the targets' ``DISTILL_EMBEDDINGS`` / ``DISTILL_WEIGHTS``."""
    clip = torch.cat([t[DISTILL_EMBEDDINGS] for t in targets])
    w = torch.cat([t[DISTILL_WEIGHTS] for t in targets])
    return distill_l1(emb, clip, w)


def rescale_distill_boxes(targets: list[dict], original_sizes, image_sizes) -> None:
    """Resize each target's ``DISTILL_BOXES`` in place from ``original_sizes`` to ``image_sizes``
    ((h, w) per image), as torchvision's transform does for ``boxes`` (it ignores keys it does not know)."""
    for t, (h0, w0), (h, w) in zip(targets, original_sizes, image_sizes):
        if DISTILL_BOXES in t:
            scale = t[DISTILL_BOXES].new_tensor([w / w0, h / h0, w / w0, h / h0])
            t[DISTILL_BOXES] = t[DISTILL_BOXES] * scale


def teacher_losses(
    student_embeddings: torch.Tensor,
    student_logits: torch.Tensor,
    student_deltas: torch.Tensor,
    teacher_embeddings: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_deltas: torch.Tensor | None = None,
    weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Distillation of a frozen teacher's RoI-head outputs into the student's, for the same RoIs.

    One term per teacher output given, each multiplied by ``weight``:

    * ``loss_teacher_embedding``: mean over RoIs of the L1 distance between the student's unit region
      embeddings and ``teacher_embeddings`` (N, D), compared as given — pass unit embeddings, as the
      teacher's own ``OVRoIHeads.predict(...).embeddings`` are (the CLIP-distillation metric);
    * ``loss_teacher_logits``: mean squared error between the student's logits and ``teacher_logits``
      (N, 1 + C) — same vocabulary in the same order, background first;
    * ``loss_teacher_deltas``: mean squared error between the student's class-agnostic box deltas and
      ``teacher_deltas`` (N, 4) (both regressed with the RoIs' label text).

    Every term is exactly 0 when the student's outputs equal the teacher's.
    """
    out = {}
    pairs = (
        ("embedding", student_embeddings, teacher_embeddings),
        ("logits", student_logits, teacher_logits),
        ("deltas", student_deltas, teacher_deltas),
    )
    for name, s, t in pairs:
        if t is None:
            continue
        if tuple(t.shape) != tuple(s.shape):
            raise OvdError(
                f"teacher {name} of shape {tuple(t.shape)} do not fit the student's {tuple(s.shape)}"
                + (" (teacher and student need the same vocabulary)" if name == "logits" else "")
            )
        t = t.detach().to(s.dtype)
        if name == "embedding":
            n = s.shape[0]
            loss = (s - t).abs().sum() / max(n, 1)
        else:
            loss = F.mse_loss(s, t, reduction="sum") / max(s.numel(), 1)
        out[f"loss_teacher_{name}"] = weight * loss
    return out
