"""What a student learns from its frozen teacher, per training step.

* FPN feature imitation: every student FPN level that has a teacher level of the same stride is
  pulled towards it by a mean squared error divided by the teacher level's mean square, through a
  1x1 convolution where the channel counts differ (the adapter is trained with the student and
  dropped from its checkpoint); a teacher map of another size (the two resize images differently) is
  resized to the student's map first.
* Region-embedding distillation: the teacher's RoI head is run on the *student's* sampled RoIs (the
  same boxes, mapped into the teacher's image frame) and the student's unit region embeddings are
  pulled towards the teacher's by the L1 of :func:`~ovd.modeling.distillation.teacher_losses` (summed
  over the embedding, averaged over RoIs, as the CLIP distillation). This keeps the student's region
  embeddings in the CLIP space the text embeddings live in, so it still takes new class names.
* Optionally the teacher's logits (same vocabulary, same order) and class-agnostic box deltas on the
  same RoIs (mean squared errors). Box deltas are relative to each RoI's own width and height, so they
  do not change with a different resize of the same image.
* IKD's adversarial feature loss: the same feature imitation on adversarial images made against the
  teacher (:func:`ovd.student.augment.difgsm`), with its own small weight.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ovd.errors import OvdError
from ovd.modeling.distillation import teacher_losses
from ovd.modeling.roi_heads import RoIBatch

ADAPTERS = "kd_adapters"  # the student's attribute holding the 1x1 adapters (not in its final checkpoint)


def level_strides(features: OrderedDict, tensor_hw: tuple[int, int]) -> dict[str, int]:
    """FPN level name -> stride (a power of two) of ``features`` computed from a (H, W) input tensor.
    Rounded in log space: the max-pool level of an odd-sized map is ceil(h / 2), not h / 2."""
    return {k: 2 ** round(math.log2(tensor_hw[0] / v.shape[-2])) for k, v in features.items()}


def extract_features(model: nn.Module, images: list) -> tuple[OrderedDict, list, tuple[int, int]]:
    """A detector's FPN features of ``images``: (features, transformed image sizes, tensor (H, W))."""
    images_t, _ = model.transform(images)
    return model.backbone(images_t.tensors), images_t.image_sizes, tuple(images_t.tensors.shape[-2:])


def match_levels(student: nn.Module, teacher: nn.Module, image_hw: tuple[int, int]) -> list[tuple]:
    """(student level, teacher level, student channels, teacher channels) of every student FPN level
    with a teacher level of the same stride, probed on a blank image in eval mode (no statistics
    change). No common stride is an error (nothing to imitate)."""
    x = [torch.zeros(3, *image_hw, device=next(student.parameters()).device)]
    with torch.no_grad():
        modes = student.training, teacher.training
        student.eval(), teacher.eval()
        fs, _, hw_s = extract_features(student, x)
        ft, _, hw_t = extract_features(teacher, x)
        student.train(modes[0]), teacher.train(modes[1])
    ss, st = level_strides(fs, hw_s), level_strides(ft, hw_t)
    by_stride = {s: k for k, s in st.items()}
    pairs = [(k, by_stride[s], fs[k].shape[1], ft[by_stride[s]].shape[1]) for k, s in ss.items() if s in by_stride]
    if not pairs:
        raise OvdError(
            f"the student's FPN strides {sorted(ss.values())} share none with the teacher's {sorted(st.values())}: "
            f"no level to imitate"
        )
    return pairs


class FeatureImitation(nn.Module):
    """Mean squared error between student FPN levels (through 1x1 adapters where the channels differ)
    and the teacher's levels of the same stride, each divided by the teacher level's mean square
    (1.0 for a student that outputs zeros), averaged over the matched levels."""

    def __init__(self, pairs: list[tuple]):
        super().__init__()
        self.pairs = [(s, t) for s, t, _, _ in pairs]
        self.adapters = nn.ModuleDict(
            {s: nn.Conv2d(cs, ct, 1) if cs != ct else nn.Identity() for s, _, cs, ct in pairs}
        )

    def forward(self, fs: OrderedDict, ft: OrderedDict) -> torch.Tensor:
        total = 0.0
        for s, t in self.pairs:
            a = self.adapters[s](fs[s])
            b = ft[t].detach().to(a.dtype)
            if b.shape[-2:] != a.shape[-2:]:
                b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
            # relative to the teacher level's mean square: FPN activations of different networks
            # (and levels) differ in scale by orders of magnitude, a raw MSE weight would not carry over
            total = total + F.mse_loss(a, b) / b.pow(2).mean().clamp(min=1e-6)
        return total / len(self.pairs)


class StudentTap:
    """Keeps, of the student's last training forward, what the distillation needs with its gradient:
    the FPN features (a forward hook on the backbone), the transformed image sizes (a hook on the
    transform) and the RoI head's sampled RoIs with their outputs (a wrapper of ``predict``)."""

    def __init__(self, model: nn.Module):
        self.features = self.image_sizes = self.batch = self.outputs = None
        self.active = True
        model.backbone.register_forward_hook(self._on_features)
        model.transform.register_forward_hook(self._on_transform)
        heads = model.roi_heads
        predict = heads.predict

        def tapped(batch, *args, **kwargs):
            out = predict(batch, *args, **kwargs)
            if self.active and heads.training:
                self.batch, self.outputs = batch, out
            return out

        heads.predict = tapped  # an instance attribute: this model only, no state_dict entry

    def _on_features(self, _module, _inputs, output):
        if self.active:
            self.features = output

    def _on_transform(self, _module, _inputs, output):
        if self.active:
            self.image_sizes = output[0].image_sizes

    def clear(self) -> None:
        self.features = self.image_sizes = self.batch = self.outputs = None


def to_frame(boxes: list[torch.Tensor], src_sizes, dst_sizes) -> list[torch.Tensor]:
    """Per image, xyxy boxes from one transformed frame ((h, w) per image) into another."""
    out = []
    for b, (h0, w0), (h1, w1) in zip(boxes, src_sizes, dst_sizes):
        out.append(b * b.new_tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0]))
    return out


def teacher_roi_outputs(teacher: nn.Module, features: OrderedDict, image_sizes, boxes: list, labels: list):
    """The teacher RoI head's outputs (embeddings, logits, deltas regressed with the label's text) for
    given boxes in its transformed frame; no gradient."""
    heads = teacher.roi_heads
    with torch.no_grad():
        pooled = heads.box_roi_pool(features, boxes, image_sizes)
        return heads.predict(RoIBatch(boxes, pooled, None, labels)).rois


def region_terms(student_rois, teacher_rois, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """``loss_kd_embedding`` / ``loss_kd_logits`` / ``loss_kd_deltas`` for the terms with a weight > 0."""
    out = {}
    for term, w in weights.items():
        if w <= 0:
            continue
        kw = {f"teacher_{term if term != 'embedding' else 'embeddings'}": getattr(teacher_rois, _field(term))}
        loss = teacher_losses(student_rois.embeddings, student_rois.logits, student_rois.deltas, weight=w, **kw)
        out[f"loss_kd_{term}"] = loss[f"loss_teacher_{term}"]
    return out


def _field(term: str) -> str:
    return {"embedding": "embeddings", "logits": "logits", "deltas": "deltas"}[term]


def region_embeddings(model: nn.Module, images: list, boxes: list) -> torch.Tensor:
    """Unit region embeddings (N, D) of a detector for given xyxy boxes (per image, in the input
    pixels of ``images``), in eval mode and without gradient: what a student and its teacher are
    compared on (:func:`embedding_gap`)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            images_t, _ = model.transform(images)
            feats = model.backbone(images_t.tensors)
            src = [tuple(x.shape[-2:]) for x in images]
            rois = to_frame(boxes, src, images_t.image_sizes)
            heads = model.roi_heads
            pooled = heads.box_roi_pool(feats, rois, images_t.image_sizes)
            return heads.classifier.embed(heads.box_head(pooled))
    finally:
        model.train(was)


def embedding_gap(student: nn.Module, teacher: nn.Module, images: list, boxes: list) -> float:
    """Mean over boxes of the L1 distance between the student's and the teacher's unit region embeddings
    (the region-embedding distillation's metric)."""
    s, t = region_embeddings(student, images, boxes), region_embeddings(teacher, images, boxes)
    return float((s - t).abs().sum(dim=1).mean())
