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
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from ovd.errors import OvdError
from ovd.modeling.distillation import rescale_distill_boxes
from ovd.modeling.roi_heads import ExtraRoIs, OVRoIHeads
from ovd.modeling.semantic_regression import SemanticBoxRegressor
from ovd.modeling.zero_shot_classifier import ZeroShotClassifier
from ovd.utils.safe_load import load_state_dict_file

BACKBONES = {
    # name: (torchvision ResNet constructor args, returned layers, anchor sizes per FPN level)
    "resnet50_fpn": ("resnet50", [1, 2, 3, 4], ((32,), (64,), (128,), (256,), (512,))),
    # the mini-world's scenes are 160 px with 14-48 px objects: a small ResNet, strides 8-32 (+ pool)
    "resnet18_fpn_small": ("resnet18", [2, 3, 4], ((16,), (32,), (64,), (128,))),
}
NORMS = {
    # ImageNet-initialised backbones keep torchvision's frozen statistics; a backbone trained from
    # scratch (the mini-world: no ImageNet weights here) needs real normalisation to learn at all.
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
}


def build_backbone(
    name: str,
    trainable_layers: int = 3,
    weights: str | None = None,
    norm: str = "frozen_bn",
    fpn_channels: int = 256,
) -> tuple[nn.Module, tuple]:
    """torchvision ResNet + FPN (``BackboneWithFPN``) with a configurable FPN width and norm layer.

    torchvision's ``resnet_fpn_backbone`` fixes the FPN at 256 channels; on CPU the RoI pooling of
    256-channel maps dominates a training step, so the width is an argument here.
    """
    if name not in BACKBONES:
        raise OvdError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")
    if norm not in NORMS:
        raise OvdError(f"unknown model.norm '{norm}' (choose from {', '.join(NORMS)})")
    if not 0 <= trainable_layers <= 5:
        raise OvdError(f"model.trainable_layers must be 0-5, got {trainable_layers}")
    arch, layers, anchors = BACKBONES[name]
    body = getattr(resnet, arch)(weights=None, norm_layer=NORMS[norm])
    if weights:
        state = _imagenet_state(arch) if weights == "imagenet" else _file_state(weights)
        own = body.state_dict()
        wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise OvdError(
                f"backbone weights {weights} do not fit {arch}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                f"expected {tuple(own[wrong[0]].shape)} (weights of another network?)"
            )
        missing, _ = body.load_state_dict(state, strict=False)
        if len(missing) == len(own):
            raise OvdError(f"backbone weights {weights} match none of {arch}'s parameters")
    # freeze the stem and the first stages like torchvision's _resnet_fpn_extractor
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for pname, p in body.named_parameters():
        if all(not pname.startswith(layer) for layer in trainable):
            p.requires_grad_(False)
    stage_channels = [body.inplanes // 8 * 2**i for i in range(4)]  # 64..512 (basic) / 256..2048 (bottleneck)
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(layers)},
        in_channels_list=[stage_channels[k - 1] for k in layers],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    return backbone, anchors


def _file_state(path: str) -> dict:
    return load_state_dict_file(path)


def _imagenet_state(arch: str) -> dict:
    """torchvision's ImageNet weights (IMAGENET1K_V1) from the torch hub cache, downloaded if needed."""
    from torchvision.models import get_model_weights

    w = get_model_weights(arch).IMAGENET1K_V1
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline: URLError / OSError; a bad cache file: RuntimeError
        raise OvdError(
            f"cannot get torchvision's ImageNet {arch} weights ({e.__class__.__name__}: {str(e)[:120]}); "
            f"offline, save them elsewhere (torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict()) "
            f"and set model.backbone_weights=FILE"
        ) from None


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
        background_unit: bool = True,
        init_logit_scale: float = 1 / 0.07,
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
            ZeroShotClassifier(rep, embed_dim, init_scale=init_logit_scale, unit_background=background_unit),
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
