"""Building the detector from a ``model`` config section (training, checkpoints, benchmarks)."""

from __future__ import annotations

from dataclasses import fields

from ovd.config_schema import ModelConfig
from ovd.modeling.backbones import build_backbone
from ovd.modeling.detector import OVFasterRCNN


def build_detector(m, embed_dim: int) -> OVFasterRCNN:
    """The open-vocabulary Faster R-CNN a ``model`` config section describes, with ``embed_dim``-d
    region embeddings (the CLIP's)."""
    backbone, anchors = build_backbone(
        m.backbone, m.trainable_layers, m.backbone_weights or None, norm=m.norm, fpn_channels=m.fpn_channels
    )
    return OVFasterRCNN(
        backbone,
        embed_dim,
        anchor_sizes=anchors,
        semantic_regression=m.semantic_regression,
        distill_weight=m.distill_weight if m.distill else 0.0,
        mask_head=m.mask_head,
        mask_channels=m.mask_channels,
        representation_size=m.representation_size,
        **torchvision_kwargs(m),
    )


def torchvision_kwargs(m) -> dict:
    """The ``model`` settings that go to torchvision's ``FasterRCNN`` unchanged (also used by the
    speed benchmark's stock model, so both are built alike)."""
    return {
        "min_size": m.min_size,
        "max_size": m.max_size,
        "box_score_thresh": m.box_score_thresh,
        "box_detections_per_img": m.box_detections_per_img,
        "box_batch_size_per_image": m.box_batch_size_per_image,
        "rpn_post_nms_top_n_train": m.rpn_post_nms_top_n_train,
        "rpn_post_nms_top_n_test": m.rpn_post_nms_top_n_test,
    }


def model_config_from_dict(stored: dict) -> ModelConfig:
    """A ``ModelConfig`` from the settings a checkpoint recorded; settings added to ovd since then
    take their defaults (so older checkpoints keep loading)."""
    return ModelConfig(**{f.name: stored[f.name] for f in fields(ModelConfig) if f.name in stored})
