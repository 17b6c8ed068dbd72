"""Open-vocabulary RoI heads (EZSD): torchvision's ``RoIHeads`` with the card's three changes.

* classification: region embedding (CLIP dimension) → :class:`ZeroShotClassifier` (cosine vs text
  embeddings of the current vocabulary + a learned background embedding, learnable temperature);
* distillation: weighted L1 between the L2-normalised region embeddings of cached boxes (GT boxes
  and mined proposals) and their L2-normalised CLIP embeddings;
* semantic-aware regression: class-agnostic deltas from the box feature concatenated with the text
  embedding of the assigned class (training) or of the predicted class (inference).

Proposal sampling, target assignment, box coding and post-processing are torchvision's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads

from ovd.modeling.zero_shot_classifier import ZeroShotClassifier


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
        if self.semantic:
            if class_text is None:
                class_text = x.new_zeros((x.shape[0], self.embed_dim))
            x = torch.cat([x, class_text.to(x.dtype)], dim=1)
        return self.fc(x)


class OVRoIHeads(RoIHeads):
    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        classifier: ZeroShotClassifier,
        regressor: SemanticBoxRegressor,
        distill_weight: float = 1.0,
        **kwargs,
    ):
        # torchvision's predictor slot is unused: the classifier and regressor replace it.
        super().__init__(box_roi_pool, box_head, nn.Identity(), **kwargs)
        self.classifier = classifier
        self.regressor = regressor
        self.distill_weight = distill_weight

    def _class_text(self, labels: torch.Tensor) -> torch.Tensor:
        """Text embedding per RoI for labels in torchvision convention (0 = background → zeros)."""
        text = self.classifier.text
        out = text.new_zeros((labels.shape[0], text.shape[1]))
        fg = labels > 0
        out[fg] = text[labels[fg] - 1]
        return out

    def distill_loss(self, features, targets, image_shapes) -> torch.Tensor:
        """Weighted L1 between unit region embeddings of the cached boxes and their unit CLIP embeddings."""
        boxes = [t["distill_boxes"] for t in targets]
        if sum(len(b) for b in boxes) == 0:
            return features[next(iter(features))].sum() * 0.0
        emb = self.classifier.embed(self.box_head(self.box_roi_pool(features, boxes, image_shapes)))
        return self._distill_l1(emb, targets)

    @staticmethod
    def _distill_l1(emb: torch.Tensor, targets) -> torch.Tensor:
        clip = F.normalize(torch.cat([t["distill_embeddings"] for t in targets]).to(emb.dtype), dim=-1)
        w = torch.cat([t["distill_weights"] for t in targets]).to(emb.dtype)
        return (w[:, None] * (emb - clip).abs()).sum() / w.sum().clamp(min=1e-6)

    def forward(self, features, proposals, image_shapes, targets=None):
        distill = (
            self.training
            and self.distill_weight > 0
            and targets is not None
            and all("distill_boxes" in t for t in targets)
        )
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        rois = proposals
        if distill:
            # the cached boxes go through the same RoI pooling + box head call as the sampled
            # proposals: one pass instead of two (RoI pooling dominates a CPU training step)
            rois = [torch.cat([p, t["distill_boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]
        box_features = self.box_head(self.box_roi_pool(features, rois, image_shapes))
        emb_all = self.classifier.embed(box_features)
        if distill:
            is_prop = torch.cat([torch.arange(len(r), device=r.device) < len(p) for r, p in zip(rois, proposals)])
            emb, emb_distill = emb_all[is_prop], emb_all[~is_prop]
            box_features = box_features[is_prop]
        else:
            emb = emb_all
        logits = self.classifier(emb)

        if self.training:
            labels_cat = torch.cat(labels)
            deltas = self.regressor(box_features, self._class_text(labels_cat))
            losses = {"loss_classifier": F.cross_entropy(logits, labels_cat)}
            pos = torch.where(labels_cat > 0)[0]
            reg_targets = torch.cat(regression_targets)
            # torchvision's fastrcnn_loss normalisation: smooth L1 summed over positives / all sampled RoIs
            losses["loss_box_reg"] = (
                F.smooth_l1_loss(deltas[pos], reg_targets[pos], beta=1 / 9, reduction="sum") / labels_cat.numel()
            )
            if distill:
                losses["loss_distill"] = self.distill_weight * self._distill_l1(emb_distill, targets)
            return [], losses

        pred = logits[:, 1:].argmax(dim=1) + 1  # the predicted class's text steers the regression
        deltas = self.regressor(box_features, self._class_text(pred))
        box_regression = deltas.repeat(1, logits.shape[1])  # class-agnostic → torchvision's per-class layout
        boxes, scores, labels = self.postprocess_detections(logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)], {}
