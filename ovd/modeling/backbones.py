"""The backbone registry: ``model.backbone`` names → torchvision feature extractor + FPN, with anchors.

Every entry is built from torchvision's own builders (``resnet``, ``mobilenet_v3_large``,
``BackboneWithFPN``, ``_mobilenet_extractor``); what an entry adds is the choice of returned stages,
the FPN width (``model.fpn_channels``; torchvision fixes it at 256, and on CPU the RoI pooling of
256-channel maps dominates a training step), the norm layer and the anchor sizes per FPN level.

To add a backbone: write a ``_build_*`` function (norm layer class, trainable layers, FPN width →
``BackboneWithFPN``) and add one :class:`BackboneSpec` to :data:`BACKBONES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision.models import get_model_weights, mobilenet_v3_large, resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from ovd.errors import OvdError
from ovd.utils.safe_load import load_state_dict_file

NORMS = {
    # ImageNet-initialised backbones keep torchvision's frozen statistics; a backbone trained from
    # scratch (the mini-world: no ImageNet weights here) needs real normalisation to learn at all.
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
}


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    ``body(norm_layer)``: the torchvision classification network whose stages feed the FPN (weights
    given by ``model.backbone_weights`` are loaded into it); ``wrap(body, trainable_layers,
    fpn_channels)``: freezes the first stages and returns the ``BackboneWithFPN``; ``anchors``: one
    tuple of anchor sizes per FPN output level; ``imagenet``: torchvision's model name whose
    IMAGENET1K_V1 weights ``backbone_weights: imagenet`` loads (None: there are none).
    """

    body: Callable[[type], nn.Module]
    wrap: Callable[[nn.Module, int, int], BackboneWithFPN]
    anchors: tuple
    imagenet: str | None
    about: str


def _resnet_body(arch: str) -> Callable[[type], nn.Module]:
    return lambda norm: getattr(resnet, arch)(weights=None, norm_layer=norm)


def _narrow_resnet18_body(norm: type) -> nn.Module:
    """ResNet-18 at half width (stages 32..256 channels, ~1/4 of the FLOPs): torchvision's ``ResNet``
    with its stem and stages rebuilt by its own ``_make_layer`` at the narrow widths (torchvision's
    BasicBlock ResNet has no width argument: ``width_per_group`` is for bottleneck blocks only)."""
    net = resnet.ResNet(resnet.BasicBlock, [2, 2, 2, 2], norm_layer=norm)
    widths = (32, 64, 128, 256)
    net.inplanes = widths[0]
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = norm(widths[0])
    for i, w in enumerate(widths):
        setattr(net, f"layer{i + 1}", net._make_layer(resnet.BasicBlock, w, 2, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(widths[-1], net.fc.out_features)
    for m in net.modules():  # ResNet.__init__'s initialisation, for the rebuilt modules
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return net


def _resnet_wrap(layers: list[int]) -> Callable[[nn.Module, int, int], BackboneWithFPN]:
    def wrap(body: nn.Module, trainable_layers: int, fpn_channels: int) -> BackboneWithFPN:
        # freeze the stem and the first stages like torchvision's _resnet_fpn_extractor
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trainable.append("bn1")
        for pname, p in body.named_parameters():
            if all(not pname.startswith(layer) for layer in trainable):
                p.requires_grad_(False)
        stage_channels = [body.inplanes // 8 * 2**i for i in range(4)]  # 64..512 (basic) / 256..2048 (bottleneck)
        return BackboneWithFPN(
            body,
            return_layers={f"layer{k}": str(i) for i, k in enumerate(layers)},
            in_channels_list=[stage_channels[k - 1] for k in layers],
            out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )

    return wrap


def _mobilenet_wrap(body: nn.Module, trainable_layers: int, fpn_channels: int) -> BackboneWithFPN:
    """torchvision's ``_mobilenet_extractor`` (the last two strided stages, strides 16 and 32, + pool);
    its FPN is 256 wide, so another ``model.fpn_channels`` replaces the FPN by one of that width."""
    bb = _mobilenet_extractor(body, True, trainable_layers)
    if fpn_channels != bb.out_channels:
        in_channels = [block[0].in_channels for block in bb.fpn.inner_blocks]
        bb.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        bb.out_channels = fpn_channels
    return bb


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50_fpn": BackboneSpec(
        _resnet_body("resnet50"), _resnet_wrap([1, 2, 3, 4]), ((32,), (64,), (128,), (256,), (512,)), "resnet50",
        "torchvision's Faster R-CNN R50-FPN backbone (strides 4-32 + pool)",
    ),
    # the mini-world's scenes are 160 px with 14-48 px objects: a small ResNet, strides 8-32 (+ pool)
    "resnet18_fpn_small": BackboneSpec(
        _resnet_body("resnet18"), _resnet_wrap([2, 3, 4]), ((16,), (32,), (64,), (128,)), "resnet18",
        "ResNet-18, strides 8-32 + pool, anchors 16-128 (small images)",
    ),
    # a small-student candidate: the same levels and anchors at half the width
    "resnet18_fpn_narrow": BackboneSpec(
        _narrow_resnet18_body, _resnet_wrap([2, 3, 4]), ((16,), (32,), (64,), (128,)), None,
        "ResNet-18 at half width (32-256 channels), strides 8-32 + pool, anchors 16-128",
    ),
    # torchvision's fasterrcnn_mobilenet_v3_large_fpn backbone and anchors (5 sizes on each of 3 levels)
    "mobilenet_v3_large_fpn": BackboneSpec(
        lambda norm: mobilenet_v3_large(weights=None, norm_layer=norm), _mobilenet_wrap,
        ((32, 64, 128, 256, 512),) * 3, "mobilenet_v3_large",
        "torchvision's Faster R-CNN MobileNetV3-Large FPN backbone (strides 16, 32 + pool)",
    ),
}  # fmt: skip


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise OvdError(f"unknown backbone model.backbone='{name}' (known: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def build_backbone(
    name: str,
    trainable_layers: int = 3,
    weights: str | None = None,
    norm: str = "frozen_bn",
    fpn_channels: int = 256,
) -> tuple[nn.Module, tuple]:
    """The registry's backbone ``name`` (a ``BackboneWithFPN``, ``out_channels`` = ``fpn_channels``)
    and its anchor sizes per FPN level. ``weights``: "imagenet" (torchvision's), a state-dict file for
    the classification network, or None (random init)."""
    spec = backbone_spec(name)
    if norm not in NORMS:
        raise OvdError(f"unknown model.norm '{norm}' (choose from {', '.join(NORMS)})")
    if not 0 <= trainable_layers <= 5:
        raise OvdError(f"model.trainable_layers must be 0-5, got {trainable_layers}")
    body = spec.body(NORMS[norm])
    if weights:
        if weights == "imagenet" and spec.imagenet is None:
            raise OvdError(
                f"backbone '{name}' has no torchvision ImageNet weights: set model.backbone_weights='' or FILE"
            )
        state = _imagenet_state(spec.imagenet) if weights == "imagenet" else load_state_dict_file(weights)
        own = body.state_dict()
        wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise OvdError(
                f"backbone weights {weights} do not fit {name}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                f"expected {tuple(own[wrong[0]].shape)} (weights of another network?)"
            )
        missing, _ = body.load_state_dict(state, strict=False)
        if len(missing) == len(own):
            raise OvdError(f"backbone weights {weights} match none of {name}'s parameters")
    return spec.wrap(body, trainable_layers, fpn_channels), spec.anchors


def _imagenet_state(arch: str) -> dict:
    """torchvision's ImageNet weights (IMAGENET1K_V1) from the torch hub cache, downloaded if needed."""
    w = get_model_weights(arch).IMAGENET1K_V1
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline: URLError / OSError; a bad cache file: RuntimeError
        raise OvdError(
            f"cannot get torchvision's ImageNet {arch} weights ({e.__class__.__name__}: {str(e)[:120]}); "
            f"offline, save them elsewhere (torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict()) "
            f"and set model.backbone_weights=FILE"
        ) from None
