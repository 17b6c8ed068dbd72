"""The open-vocabulary Faster R-CNN: torchvision's detection parts around :class:`OVRoIHeads`.

Backbone (:mod:`ovd.modeling.backbones`), transform, RPN, RoI pooling and the two-layer box head are
torchvision's; the RoI heads are the open-vocabulary ones (zero-shot classifier, distillation,
semantic-aware regression, optionally a class-agnostic mask branch). The model is assembled from
those parts as torchvision's ``FasterRCNN`` constructor assembles its own, without building its stock
``RoIHeads``.

The forward pass has two seams a caller can use on its own::

    s = model.features_and_proposals(images, targets)   # transform, target checks, backbone, RPN
    detections, losses = model.roi_heads(s.features, s.proposals, s.images.image_sizes, s.targets)

(the RoI heads themselves run in parts, see :mod:`ovd.modeling.roi_heads`). Beyond torchvision's
forward: targets may carry cached distillation boxes
(:data:`~ovd.modeling.distillation.DISTILL_BOXES` xyxy, ``DISTILL_EMBEDDINGS``, ``DISTILL_WEIGHTS``),
which are resized with the image like ``boxes`` (torchvision's transform resizes only the keys it
knows); in training, ``extra_rois=`` feeds already pooled RoI features to the RoI heads
(:class:`~ovd.modeling.roi_heads.ExtraRoIs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from ovd.errors import OvdError
from ovd.modeling.distillation import rescale_distill_boxes
from ovd.modeling.roi_heads import ExtraRoIs, OVRoIHeads
from ovd.modeling.semantic_regression import SemanticBoxRegressor
from ovd.modeling.zero_shot_classifier import ZeroShotClassifier

# torchvision's Mask R-CNN mask branch: 14 x 14 RoI pooling, four 3 x 3 convolutions and a 2x
# deconvolution (256 channels in torchvision: model.mask_channels), one output channel here
MASK_POOL_SIZE = 14
MASK_CONVS = 4


@dataclass
class FeaturesAndProposals:
    """:meth:`OVFasterRCNN.features_and_proposals`' result: everything before the RoI heads."""

    images: ImageList  # the transformed (resized, normalised, batched) images; image_sizes per image
    original_sizes: list[tuple[int, int]]  # (h, w) of each input image
    targets: list[dict] | None  # the targets in the transformed frame (copies; None without targets)
    features: dict[str, torch.Tensor]  # the backbone's FPN maps
    proposals: list[torch.Tensor]  # per image (P_i, 4) RPN proposals in the transformed frame
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # the RPN's losses (training)


class OVFasterRCNN(GeneralizedRCNN):
    # ~90 lines, most of them torchvision's constructor arguments: the parts are built in the order
    # torchvision's FasterRCNN builds them, so a seed gives the weights it always gave
    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        anchor_sizes: tuple = ((32,), (64,), (128,), (256,), (512,)),
        semantic_regression: bool = True,
        distill_weight: float = 1.0,
        mask_head: bool = False,
        mask_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        # RPN: torchvision's FasterRCNN defaults
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        # RoI heads
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        representation_size: int = 1024,
        background_unit: bool = True,
        init_logit_scale: float = 1 / 0.07,
        **transform_kwargs,
    ):
        # torchvision's FasterRCNN constructor, part by part, in its order (so a seed gives the weights
        # it gave when ovd built torchvision's FasterRCNN and replaced its RoI heads)
        anchor_gen = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        # torchvision's two-layer box head; its width is the main cost per RoI on CPU
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, representation_size)
        rpn = RegionProposalNetwork(
            anchor_gen,
            RPNHead(backbone.out_channels, anchor_gen.num_anchors_per_location()[0]),
            rpn_fg_iou_thresh,
            rpn_bg_iou_thresh,
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
            rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
        )
        _draw_like_the_stock_predictor()
        mask = {}
        if mask_head:  # class-agnostic: one mask channel whatever the class (novel classes get masks too)
            mask = {
                "mask_roi_pool": MultiScaleRoIAlign(["0", "1", "2", "3"], MASK_POOL_SIZE, sampling_ratio=2),
                "mask_head": MaskRCNNHeads(backbone.out_channels, [mask_channels] * MASK_CONVS, 1),
                "mask_predictor": MaskRCNNPredictor(mask_channels, mask_channels, 1),
            }
        roi_heads = OVRoIHeads(
            MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=2),
            box_head,
            ZeroShotClassifier(
                representation_size, embed_dim, init_scale=init_logit_scale, unit_background=background_unit
            ),
            SemanticBoxRegressor(representation_size, embed_dim, semantic=semantic_regression),
            distill_weight=distill_weight,
            fg_iou_thresh=box_fg_iou_thresh,
            bg_iou_thresh=box_bg_iou_thresh,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=box_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
            **mask,
        )
        transform = GeneralizedRCNNTransform(
            min_size,
            max_size,
            [0.485, 0.456, 0.406] if image_mean is None else image_mean,
            [0.229, 0.224, 0.225] if image_std is None else image_std,
            **transform_kwargs,
        )
        super().__init__(backbone, rpn, roi_heads, transform)

    @property
    def embed_dim(self) -> int:
        return self.roi_heads.classifier.embed_dim

    @property
    def has_mask(self) -> bool:
        return self.roi_heads.has_mask()

    def set_vocabulary(self, text: torch.Tensor) -> None:
        """Detect these classes from now on: (C, D) text embeddings; labels 1..C index them."""
        self.roi_heads.classifier.set_vocabulary(text)

    def features_and_proposals(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """The first half of the forward pass: torchvision's target checks, the transform (targets are
        copied and resized with the images, cached distillation boxes too), the backbone and the RPN
        (its losses in training). Returns :class:`FeaturesAndProposals`."""
        check_targets(images, targets, self.training)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        images_t, targets_t = self.transform(images, targets)  # copies the target dicts
        if targets_t is not None:
            rescale_distill_boxes(targets_t, original_sizes, images_t.image_sizes)
            check_box_sizes(targets_t, targets)
        features = self.backbone(images_t.tensors)
        proposals, proposal_losses = self.rpn(images_t, features, targets_t)
        return FeaturesAndProposals(images_t, original_sizes, targets_t, features, proposals, proposal_losses)

    def forward(self, images, targets=None, extra_rois: ExtraRoIs | None = None):
        """torchvision's forward; ``extra_rois`` (training only): pooled RoI features with labels (and
        optional teacher targets) that join the sampled RoIs after RoI pooling, see :class:`ExtraRoIs`.
        In eval mode with the mask head, each detection dict also has ``masks`` (N, 1, H, W) float in
        [0, 1] at the input image's size, like torchvision's Mask R-CNN."""
        s = self.features_and_proposals(images, targets)
        extra = {} if extra_rois is None else {"extra_rois": extra_rois}  # RoI heads with torchvision's signature work
        detections, detector_losses = self.roi_heads(s.features, s.proposals, s.images.image_sizes, s.targets, **extra)
        if self.training:
            return {**s.losses, **detector_losses}
        return self.transform.postprocess(detections, s.images.image_sizes, s.original_sizes)


def _draw_like_the_stock_predictor() -> None:
    """Draw the random numbers torchvision's FasterRCNN constructor drew at this point for its stock
    ``FastRCNNPredictor(1024, 2)`` (two ``nn.Linear`` inits: weight then bias, scores then boxes),
    which ovd used to build and replace: every seed keeps giving the initial weights, and so the
    results, it gave before the RoI heads were built directly. ``tests/test_seams.py`` checks it."""
    with torch.no_grad():
        for rows in (2, 2 * 4):
            torch.empty(rows, 1024).uniform_()
            torch.empty(rows).uniform_()


def check_targets(images: list[torch.Tensor], targets: list[dict] | None, training: bool) -> None:
    """torchvision's checks of the caller's targets (GeneralizedRCNN.forward), as one clear error: a
    training forward needs them; each has ``boxes`` (N, 4) and ``labels`` (N,); ``masks``, when
    given, are (N, H, W) at the image's size."""
    if targets is None:
        if training:
            raise OvdError("a detector in training mode needs targets (a dict with boxes and labels per image)")
        return
    if len(targets) != len(images):
        raise OvdError(f"got {len(images)} image(s) but {len(targets)} target dict(s)")
    for i, (img, t) in enumerate(zip(images, targets)):
        boxes = t.get("boxes")
        if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
            raise OvdError(f"target {i}: 'boxes' must be a tensor of shape (N, 4), got {got}")
        labels = t.get("labels")
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (len(boxes),):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise OvdError(f"target {i}: 'labels' must be a tensor of shape ({len(boxes)},), got {got}")
        masks = t.get("masks")
        if masks is not None and (
            not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (len(boxes), *img.shape[-2:])
        ):
            got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise OvdError(
                f"target {i}: 'masks' must be a tensor of shape ({len(boxes)}, {img.shape[-2]}, {img.shape[-1]}) "
                f"(one image-sized mask per box), got {got}"
            )


def check_box_sizes(targets_t: list[dict], targets: list[dict]) -> None:
    """torchvision's degenerate-box check (after the transform): every box has positive width and height."""
    for i, t in enumerate(targets_t):
        bad = (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(dim=1)
        if bad.any():
            j = int(torch.where(bad)[0][0])
            raise OvdError(
                f"target {i}: every box needs a positive width and height (x1 < x2, y1 < y2); box {j} is "
                f"{[round(float(v), 3) for v in targets[i]['boxes'][j]]}"
            )
