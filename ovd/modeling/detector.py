"""The open-vocabulary Faster R-CNN: torchvision's FasterRCNN with :class:`OVRoIHeads`.

Backbone, transform, RPN, RoI pooling and the two-layer box head are torchvision's; the RoI heads
are replaced by the open-vocabulary ones (zero-shot classifier, distillation, semantic-aware
regression). The changes to the forward pass: targets may carry cached distillation boxes
(:data:`~ovd.modeling.distillation.DISTILL_BOXES` xyxy, ``DISTILL_EMBEDDINGS``, ``DISTILL_WEIGHTS``),
which are resized with the image like ``boxes`` (torchvision's transform resizes only the keys it
knows); in training, ``extra_rois=`` feeds already pooled RoI features to the RoI heads
(:class:`~ovd.modeling.roi_heads.ExtraRoIs`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from ovd.modeling.distillation import rescale_distill_boxes
from ovd.modeling.roi_heads import ExtraRoIs, OVRoIHeads
from ovd.modeling.semantic_regression import SemanticBoxRegressor
from ovd.modeling.zero_shot_classifier import ZeroShotClassifier


class OVFasterRCNN(FasterRCNN):
    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        anchor_sizes: tuple = ((32,), (64,), (128,), (256,), (512,)),
        semantic_regression: bool = True,
        distill_weight: float = 1.0,
        min_size: int = 800,
        max_size: int = 1333,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        representation_size: int = 1024,
        **kwargs,
    ):
        anchor_gen = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        # torchvision's two-layer box head; its width is the main cost per RoI on CPU
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, representation_size)
        super().__init__(
            backbone,
            num_classes=2,
            rpn_anchor_generator=anchor_gen,
            box_head=box_head,
            min_size=min_size,
            max_size=max_size,
            **kwargs,
        )
        stock = self.roi_heads
        rep = stock.box_head.fc7.out_features
        self.roi_heads = OVRoIHeads(
            stock.box_roi_pool,
            stock.box_head,
            ZeroShotClassifier(rep, embed_dim),
            SemanticBoxRegressor(rep, embed_dim, semantic=semantic_regression),
            distill_weight=distill_weight,
            fg_iou_thresh=box_fg_iou_thresh,
            bg_iou_thresh=box_bg_iou_thresh,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=box_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
        )

    @property
    def embed_dim(self) -> int:
        return self.roi_heads.classifier.embed_dim

    def set_vocabulary(self, text: torch.Tensor) -> None:
        """Detect these classes from now on: (C, D) text embeddings; labels 1..C index them."""
        self.roi_heads.classifier.set_vocabulary(text)

    def forward(self, images, targets=None, extra_rois: ExtraRoIs | None = None):
        """torchvision's forward; ``extra_rois`` (training only): pooled RoI features with labels (and
        optional teacher targets) that join the sampled RoIs after RoI pooling, see :class:`ExtraRoIs`."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        images_t, targets_t = self.transform(images, targets)  # copies the target dicts
        if targets_t is not None:
            rescale_distill_boxes(targets_t, original_sizes, images_t.image_sizes)
        features = self.backbone(images_t.tensors)
        proposals, proposal_losses = self.rpn(images_t, features, targets_t)
        extra = {} if extra_rois is None else {"extra_rois": extra_rois}  # RoI heads with torchvision's signature work
        detections, detector_losses = self.roi_heads(features, proposals, images_t.image_sizes, targets_t, **extra)
        if self.training:
            return {**proposal_losses, **detector_losses}
        return self.transform.postprocess(detections, images_t.image_sizes, original_sizes)
