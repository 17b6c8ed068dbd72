"""The backbone registry: every name builds a detector that trains and detects; torchvision equality;
an unknown name is one error naming the known ones."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from ovd.config_schema import ModelConfig
from ovd.errors import OvdError
from ovd.modeling.backbones import BACKBONES, build_backbone
from ovd.modeling.build import build_detector

D = 16


def _same_module(ours, ref, x):
    po, pr = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert po.keys() == pr.keys()
    for k in po:
        assert torch.equal(po[k], pr[k]), k
        assert po[k].requires_grad == pr[k].requires_grad, k
    ours.eval(), ref.eval()
    with torch.no_grad():
        yo, yr = ours(x), ref(x)
    assert list(yo) == list(yr)
    for k in yo:
        assert torch.equal(yo[k], yr[k]), k


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_a_detector_that_trains_and_detects(name):
    torch.manual_seed(0)
    m = ModelConfig(backbone=name, fpn_channels=32, representation_size=32, min_size=96, max_size=96,
                    box_batch_size_per_image=16, box_score_thresh=0.0, norm="bn", trainable_layers=5)  # fmt: skip
    model = build_detector(m, D)
    model.set_vocabulary(torch.randn(3, D))
    assert model.backbone.out_channels == 32
    images = [torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([2])}]
    losses = model.train()(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.body.parameters())
    with torch.no_grad():
        out = model.eval()(images)
    assert out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) == len(out[0]["scores"])


def test_unknown_backbone_is_one_error_listing_the_known_ones():
    with pytest.raises(OvdError, match="unknown backbone model.backbone='vgg16'") as e:
        build_backbone("vgg16")
    assert all(name in str(e.value) for name in BACKBONES)
    with pytest.raises(OvdError, match="vgg16"):
        build_detector(ModelConfig(backbone="vgg16"), D)


def test_resnet50_fpn_is_torchvisions():
    torch.manual_seed(3)
    ours, anchors = build_backbone("resnet50_fpn", 3)
    torch.manual_seed(3)
    ref = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    assert len(anchors) == 5
    _same_module(ours, ref, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))


def test_mobilenet_v3_large_fpn_is_torchvisions():
    torch.manual_seed(4)
    ours, anchors = build_backbone("mobilenet_v3_large_fpn", 3)
    torch.manual_seed(4)
    ref = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                             norm_layer=FrozenBatchNorm2d, trainable_layers=3)  # fmt: skip
    assert anchors == ((32, 64, 128, 256, 512),) * 3  # torchvision's fasterrcnn_mobilenet_v3_large_fpn
    _same_module(ours, ref, torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)))
    narrow, _ = build_backbone("mobilenet_v3_large_fpn", 3, fpn_channels=48)
    with torch.no_grad():
        out = narrow.eval()(torch.rand(1, 3, 96, 96))
    assert narrow.out_channels == 48 and list(out) == ["0", "1", "pool"]
    assert all(v.shape[1] == 48 for v in out.values())


def test_narrow_resnet18_is_half_as_wide_with_the_same_levels():
    small, anchors_s = build_backbone("resnet18_fpn_small", 5, norm="bn", fpn_channels=32)
    narrow, anchors_n = build_backbone("resnet18_fpn_narrow", 5, norm="bn", fpn_channels=32)
    assert anchors_s == anchors_n
    for i in range(1, 5):
        ws = getattr(small.body, f"layer{i}")[-1].conv2.out_channels
        assert getattr(narrow.body, f"layer{i}")[-1].conv2.out_channels == ws // 2
    count = lambda bb: sum(p.numel() for p in bb.body.parameters())  # noqa: E731
    assert count(narrow) < count(small) / 3.5  # about a quarter of the weights
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ys, yn = small.eval()(x), narrow.eval()(x)
    assert {k: v.shape for k, v in ys.items()} == {k: v.shape for k, v in yn.items()}
    assert any(isinstance(m, FrozenBatchNorm2d) for m in build_backbone("resnet18_fpn_narrow", 3)[0].modules())
    with pytest.raises(OvdError, match="no torchvision ImageNet weights"):
        build_backbone("resnet18_fpn_narrow", weights="imagenet")
