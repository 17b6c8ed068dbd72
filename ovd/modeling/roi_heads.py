"""Open-vocabulary RoI heads (EZSD): torchvision's ``RoIHeads`` with the card's three changes.

* classification: region embedding (CLIP dimension) → :class:`ZeroShotClassifier` (cosine vs text
  embeddings of the current vocabulary + a learned background embedding, learnable temperature);
* distillation (:mod:`ovd.modeling.distillation`): weighted L1 between the L2-normalised region
  embeddings of cached boxes (GT boxes and mined proposals) and their L2-normalised CLIP embeddings;
* semantic-aware regression (:mod:`ovd.modeling.semantic_regression`): class-agnostic deltas from the
  box feature concatenated with the text embedding of the assigned class (training) or of the
  predicted class (inference).

Proposal sampling, target assignment, box coding and post-processing are torchvision's own.

The forward pass is split into parts a subclass or a caller can use on their own::

    batch = heads.pool_rois(features, proposals, image_shapes, targets)   # sampling + RoI pooling
    outputs = heads.predict(batch, extra_rois)        # box head → embedding → logits / box deltas
    losses = heads.compute_losses(batch, outputs, targets, extra_rois)    # training
    detections = heads.detections(batch, outputs, image_shapes)           # inference
    losses |= heads.mask_losses(features, batch, targets, image_shapes)   # mask branch, training
    heads.add_masks(features, detections, image_shapes)                   # mask branch, inference

``sample_rois(proposals, targets, subsample=False)`` labels every proposal by training-time matching
without the random sampler (the replay data watchers' RoIs).

``extra_rois=ExtraRoIs(features, labels, teacher_...)``: RoIs given as already pooled features
(N, C, 7, 7) with labels in 0..C (0 = background). They enter after RoI pooling, go through the
same box head, classifier and classification loss as the sampled proposals, and may carry a frozen
teacher's outputs to distil (data-free replay of forged base-class RoI features). They have no box,
so they take no part in the box-regression loss (nor in the mask loss).

The mask branch (optional, ``mask_roi_pool`` / ``mask_head`` / ``mask_predictor`` as in torchvision's
``RoIHeads``) is class-agnostic: the predictor has one output channel, trained on the positive
sampled RoIs against their matched GT masks, and every detection gets a mask whatever its class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss

from ovd.errors import OvdError
from ovd.modeling.distillation import DISTILL_BOXES, distill_loss, has_distill_targets, teacher_losses
from ovd.modeling.semantic_regression import SemanticBoxRegressor, class_text
from ovd.modeling.zero_shot_classifier import ZeroShotClassifier

__all__ = ["ExtraRoIs", "OVRoIHeads", "RoIBatch", "RoIOutputs", "RoIPredictions", "SemanticBoxRegressor"]


@dataclass
class ExtraRoIs:
    """RoIs fed to the RoI head after RoI pooling: features without an image or a box.

    ``features`` (N, C, h, w): pooled like ``box_roi_pool``'s output (C = FPN channels, 7 × 7);
    ``labels`` (N,) int64 in 0..C (0 = background, k = the vocabulary's k-th class), the convention of
    the sampled proposals. They join the classification loss (one cross-entropy over sampled + extra
    RoIs) but not the box-regression loss, which stays normalised by the sampled RoIs alone.

    Teacher targets (optional, for the same N RoIs, e.g. a frozen base model's RoI head run on the
    same features): ``teacher_embeddings`` (N, D) unit region embeddings, ``teacher_logits``
    (N, 1 + C) over the same vocabulary, ``teacher_deltas`` (N, 4) class-agnostic deltas regressed with
    the label's text. Each one given adds a ``loss_teacher_*`` term (see
    :func:`ovd.modeling.distillation.teacher_losses`) weighted by ``teacher_weight``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    teacher_embeddings: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    teacher_deltas: torch.Tensor | None = None
    teacher_weight: float = 1.0

    def __len__(self) -> int:
        return self.features.shape[0]

    def check(self, pooled_shape: tuple | None, num_classes: int) -> None:
        f, lab = self.features, self.labels
        if f.ndim != 4:
            raise OvdError(f"extra RoI features must be pooled (N, C, h, w), got shape {tuple(f.shape)}")
        if pooled_shape is not None and tuple(f.shape[1:]) != tuple(pooled_shape):
            raise OvdError(
                f"extra RoI features of shape {tuple(f.shape[1:])} per RoI do not fit the RoI pooling's "
                f"{tuple(pooled_shape)}"
            )
        if lab.ndim != 1 or lab.shape[0] != f.shape[0] or lab.dtype != torch.int64:
            raise OvdError(
                f"extra RoI labels must be int64 of shape ({f.shape[0]},), got {lab.dtype} {tuple(lab.shape)}"
            )
        if len(lab) and (int(lab.min()) < 0 or int(lab.max()) > num_classes):
            raise OvdError(
                f"extra RoI labels must lie in 0..{num_classes} (0 = background, then the vocabulary), "
                f"got {int(lab.min())}..{int(lab.max())}"
            )


@dataclass
class RoIBatch:
    """The image RoIs of one forward after sampling and pooling (:meth:`OVRoIHeads.pool_rois`).

    ``pooled`` rows are, image after image, the image's proposals (sampled ones in training) followed
    by its cached distillation boxes when distillation is on; ``is_proposal`` marks the proposal rows
    (None: all rows are proposals). ``pooled`` is None when there is no image.
    """

    proposals: list[torch.Tensor]  # per image (P_i, 4) proposal boxes, in the transformed image frame
    pooled: torch.Tensor | None = None  # (P + Q, C, h, w)
    is_proposal: torch.Tensor | None = None  # (P + Q,) bool, or None when Q == 0
    labels: list[torch.Tensor] | None = None  # per image (P_i,) sampled labels (training / sampling)
    regression_targets: list[torch.Tensor] | None = None  # per image (P_i, 4)
    matched_idxs: list[torch.Tensor] | None = None  # per image (P_i,) matched GT index (for labels > 0)
    distill: bool = False  # the cached distillation boxes are among the rows


@dataclass
class RoIPredictions:
    """The RoI head's outputs for a set of RoIs, one row each."""

    box_features: torch.Tensor  # (N, R) box-head output
    embeddings: torch.Tensor  # (N, D) unit region embeddings
    logits: torch.Tensor  # (N, 1 + C), column 0 = background
    deltas: torch.Tensor  # (N, 4) class-agnostic deltas (label text if labelled, else predicted class's)


@dataclass
class RoIOutputs:
    """:meth:`OVRoIHeads.predict`'s result: outputs of the proposals, the distillation boxes and the extra RoIs."""

    rois: RoIPredictions | None = None  # the proposal rows of the RoIBatch (None without images)
    distill_embeddings: torch.Tensor | None = None  # (Q, D) unit embeddings of the cached boxes
    extra: RoIPredictions | None = None  # the ExtraRoIs rows


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
        # Training batches must carry GT masks while this is True (and the mask branch exists); set it
        # False to train the rest on box annotations and leave the mask branch as it is (few-shot).
        self.train_masks = True

    def check_targets(self, targets) -> None:
        """torchvision's check of the training targets, as one clear error; ``masks`` are needed only
        in training with the mask branch on and ``train_masks``."""
        if targets is None:
            raise OvdError("the RoI heads need targets to sample training RoIs")
        keys = ("boxes", "labels") + (("masks",) if self.has_mask() and self.training and self.train_masks else ())
        for i, t in enumerate(targets):
            missing = [k for k in keys if k not in t]
            if missing:
                why = " (the mask head is on: model.mask_head)" if missing == ["masks"] else ""
                raise OvdError(f"target {i} has no '{missing[0]}'{why}")

    def _class_text(self, labels: torch.Tensor) -> torch.Tensor:
        """Text embedding per RoI for labels in torchvision convention (0 = background → zeros)."""
        return class_text(self.classifier.text, labels)

    # --- part 1: sampling + RoI pooling ----------------------------------------------------------------
    def sample_rois(self, proposals: list[torch.Tensor], targets: list[dict], subsample: bool = True):
        """Training-time target assignment: GT boxes are added to the proposals, each is matched to a GT
        box (labels 1..C, 0 = background), then torchvision's balanced sampler keeps a fixed-size subset.

        ``subsample=False`` keeps every matched proposal instead (those between the IoU thresholds,
        label -1, are dropped) and draws no random numbers. Returns ``(proposals, matched_idxs, labels,
        regression_targets)``, per image, like torchvision's ``select_training_samples``.
        """
        if subsample:
            return self.select_training_samples(proposals, targets)
        self.check_targets(targets)
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        matched_gt_boxes = []
        for i in range(len(proposals)):
            keep = torch.where(labels[i] >= 0)[0]
            proposals[i], labels[i], matched_idxs[i] = proposals[i][keep], labels[i][keep], matched_idxs[i][keep]
            gt = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(gt[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets

    def pool_rois(self, features, proposals, image_shapes, targets=None) -> RoIBatch:
        """Box features part 1: in training, sample the proposals (:meth:`select_training_samples`) and
        add each image's cached distillation boxes when distillation is on; RoI-pool them all in one pass
        (RoI pooling dominates a CPU training step). In eval, pool the proposals as given."""
        if len(proposals) == 0:
            return RoIBatch(proposals=[])
        labels = regression_targets = matched_idxs = None
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        distill = self.training and self.distill_weight > 0 and has_distill_targets(targets)
        rois, is_proposal = proposals, None
        if distill:
            rois = [torch.cat([p, t[DISTILL_BOXES].to(p.dtype)]) for p, t in zip(proposals, targets)]
            is_proposal = torch.cat([torch.arange(len(r), device=r.device) < len(p) for r, p in zip(rois, proposals)])
        pooled = self.box_roi_pool(features, rois, image_shapes)
        return RoIBatch(proposals, pooled, is_proposal, labels, regression_targets, matched_idxs, distill)

    # --- part 2: box head → embedding → classifier / semantic regression -------------------------------
    def head_outputs(
        self, box_features: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor | None
    ) -> RoIPredictions:
        """Logits and deltas of box-head outputs and their unit embeddings; the regression is steered by
        the text of ``labels`` if given (training), else of the predicted class (inference)."""
        logits = self.classifier(embeddings)
        if labels is None:
            labels = logits[:, 1:].argmax(dim=1) + 1  # the predicted class's text steers the regression
        deltas = self.regressor(box_features, self._class_text(labels))
        return RoIPredictions(box_features, embeddings, logits, deltas)

    def predict(self, batch: RoIBatch, extra_rois: ExtraRoIs | None = None) -> RoIOutputs:
        """Box features part 2 and predictions: one box-head pass over the batch's pooled rows followed by
        the extra RoIs' features, then the region embeddings, and logits / deltas per part."""
        if extra_rois is not None:
            extra_rois.check(None if batch.pooled is None else batch.pooled.shape[1:], len(self.classifier.text))
        parts = [p for p in (batch.pooled, None if extra_rois is None else extra_rois.features) if p is not None]
        if not parts:
            raise OvdError("the RoI head got no RoIs: neither images with proposals nor extra_rois")
        pooled = parts[0] if len(parts) == 1 else torch.cat(parts)
        box_all = self.box_head(pooled)
        emb_all = self.classifier.embed(box_all)
        out = RoIOutputs()
        n = 0
        if batch.pooled is not None:
            n = batch.pooled.shape[0]
            box, emb = (box_all, emb_all) if extra_rois is None else (box_all[:n], emb_all[:n])
            keep = batch.is_proposal
            if keep is not None:
                emb, out.distill_embeddings = emb[keep], emb[~keep]
                box = box[keep]
            labels = None if batch.labels is None else torch.cat(batch.labels)
            out.rois = self.head_outputs(box, emb, labels)
        if extra_rois is not None:
            out.extra = self.head_outputs(box_all[n:], emb_all[n:], extra_rois.labels)
        return out

    # --- part 3: losses / detections -------------------------------------------------------------------
    def compute_losses(
        self, batch: RoIBatch, outputs: RoIOutputs, targets=None, extra_rois: ExtraRoIs | None = None
    ) -> dict[str, torch.Tensor]:
        """``loss_classifier``: cross-entropy over the sampled and the extra RoIs together;
        ``loss_box_reg``: torchvision's smooth L1 over the positive sampled RoIs divided by the number of
        sampled RoIs (extra RoIs have no box: not counted); ``loss_distill`` when the cached boxes were
        pooled; ``loss_teacher_*`` when the extra RoIs carry teacher targets."""
        logits, labels = [], []
        if outputs.rois is not None:
            logits.append(outputs.rois.logits)
            labels.append(torch.cat(batch.labels))
        if outputs.extra is not None:
            logits.append(outputs.extra.logits)
            labels.append(extra_rois.labels)
        cat = (lambda xs: xs[0]) if len(logits) == 1 else torch.cat
        losses = {"loss_classifier": F.cross_entropy(cat(logits), cat(labels))}
        if outputs.rois is not None:
            labels_cat = labels[0]
            pos = torch.where(labels_cat > 0)[0]
            reg_targets = torch.cat(batch.regression_targets)
            # torchvision's fastrcnn_loss normalisation: smooth L1 summed over positives / all sampled RoIs
            losses["loss_box_reg"] = (
                F.smooth_l1_loss(outputs.rois.deltas[pos], reg_targets[pos], beta=1 / 9, reduction="sum")
                / labels_cat.numel()
            )
        else:
            losses["loss_box_reg"] = outputs.extra.deltas.sum() * 0.0
        if batch.distill:
            losses["loss_distill"] = self.distill_weight * distill_loss(outputs.distill_embeddings, targets)
        if extra_rois is not None:
            e = outputs.extra
            losses.update(
                teacher_losses(
                    e.embeddings,
                    e.logits,
                    e.deltas,
                    extra_rois.teacher_embeddings,
                    extra_rois.teacher_logits,
                    extra_rois.teacher_deltas,
                    weight=extra_rois.teacher_weight,
                )
            )
        return losses

    def detections(self, batch: RoIBatch, outputs: RoIOutputs, image_shapes) -> list[dict[str, torch.Tensor]]:
        """torchvision's post-processing (decode, clip, score threshold, per-class NMS) of the proposal rows."""
        if outputs.rois is None:
            return []
        logits = outputs.rois.logits
        box_regression = outputs.rois.deltas.repeat(1, logits.shape[1])  # class-agnostic → per-class layout
        boxes, scores, labels = self.postprocess_detections(logits, box_regression, batch.proposals, image_shapes)
        return [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]

    # --- part 4: the mask branch (class-agnostic) --------------------------------------------------------
    def mask_logits(self, features, boxes: list[torch.Tensor], image_shapes) -> torch.Tensor:
        """(N, 1, 28, 28) mask logits of the boxes (per image, transformed frame): torchvision's mask
        pooler, head and one-channel predictor."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def mask_losses(self, features, batch: RoIBatch, targets, image_shapes) -> dict[str, torch.Tensor]:
        """``loss_mask``: torchvision's ``maskrcnn_loss`` over the positive sampled RoIs (the images'
        base-class GT, as trained) against their matched GT masks, every class on the one channel."""
        pos = [torch.where(lab > 0)[0] for lab in batch.labels]
        boxes = [p[i] for p, i in zip(batch.proposals, pos)]
        matched = [m[i] for m, i in zip(batch.matched_idxs, pos)]
        one_channel = [torch.zeros_like(t["labels"]) for t in targets]  # class-agnostic: channel 0 for all
        logits = self.mask_logits(features, boxes, image_shapes)
        return {"loss_mask": maskrcnn_loss(logits, boxes, [t["masks"] for t in targets], one_channel, matched)}

    def add_masks(self, features, detections: list[dict], image_shapes) -> None:
        """Give every detection ``masks`` (1, 28, 28) probabilities in its box, whatever its class
        (torchvision's ``maskrcnn_inference``; the transform's postprocess pastes them into the image)."""
        boxes = [d["boxes"] for d in detections]
        probs = maskrcnn_inference(
            self.mask_logits(features, boxes, image_shapes), [torch.zeros_like(d["labels"]) for d in detections]
        )
        for d, p in zip(detections, probs):
            d["masks"] = p

    # --- forward ------------------------------------------------------------------------------------------
    def forward(self, features, proposals, image_shapes, targets=None, extra_rois: ExtraRoIs | None = None):
        """torchvision's ``RoIHeads.forward`` plus ``extra_rois`` (training only, see :class:`ExtraRoIs`).

        With no image (``proposals == []``) and ``extra_rois`` given, only the extra RoIs are used.
        """
        if extra_rois is not None and not self.training:
            raise OvdError("extra_rois are a training input: in eval, call predict(RoIBatch([]), extra_rois)")
        batch = self.pool_rois(features, proposals, image_shapes, targets)
        outputs = self.predict(batch, extra_rois)
        masks = self.has_mask() and batch.pooled is not None
        if self.training:
            losses = self.compute_losses(batch, outputs, targets, extra_rois)
            if masks and self.train_masks:
                losses.update(self.mask_losses(features, batch, targets, image_shapes))
            return [], losses
        detections = self.detections(batch, outputs, image_shapes)
        if masks:
            self.add_masks(features, detections, image_shapes)
        return detections, {}
