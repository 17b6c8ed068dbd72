"""The shipped COCO / LVIS configs: they load, their ResNet-50-FPN detectors and (shared) ViT-B-32 CLIP
build (randomly initialised: no weights are shipped), backbone weights files load or are refused, and
``build_backbone`` matches torchvision's ``resnet_fpn_backbone``. LVIS v1 image paths come from coco_url."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.errors import OvdError
from ovd.modeling.backbones import build_backbone
from ovd.modeling.build import build_detector
from ovd.vlm.clip import clip_from_config

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "configs" / "coco" / "ovd_48_17_ezsd.yaml"
LVIS = REPO / "configs" / "lvis" / "ovd_rare_ezsd.yaml"
SMALL = ["model.backbone_weights=", "model.min_size=64", "model.max_size=64"]


# --- loading ---------------------------------------------------------------------------------------
def test_coco_config_values():
    cfg = load_config(COCO)
    assert cfg.name == "coco-ovd-48-17" and cfg.work_dir == "work_dirs/coco-ovd-48-17"
    assert cfg.data.split == "coco_ovd_48_17"
    assert cfg.data.lvis is None
    assert cfg.data.train_json.endswith("instances_train2017.json")
    assert cfg.data.val_image_root == "data/coco/val2017"
    assert cfg.model.backbone == "resnet50_fpn" and cfg.model.trainable_layers == 3
    assert cfg.model.norm == "frozen_bn" and cfg.model.fpn_channels == 256
    assert (cfg.model.min_size, cfg.model.max_size) == (800, 1333)
    assert cfg.model.backbone_weights == "imagenet"
    assert cfg.clip.model == "ViT-B-32" and cfg.clip.pretrained == "openai"
    assert len(cfg.clip.templates) == 6
    assert cfg.train.schedule == "1x" and cfg.train.batch_size == 16
    assert cfg.model.mask_head is True


def test_lvis_config_values():
    cfg = load_config(LVIS)
    assert cfg.name == "lvis-ovd-rare" and cfg.work_dir == "work_dirs/lvis-ovd-rare"
    assert cfg.data.split == "lvis_rare"
    assert cfg.data.lvis is True
    assert cfg.data.train_json == "data/lvis/lvis_v1_train.json"
    assert cfg.data.image_root == "data/coco" and cfg.data.val_image_root == "data/coco"
    # inherited from the COCO config
    assert cfg.model.backbone == "resnet50_fpn" and cfg.model.trainable_layers == 3
    assert cfg.clip.model == "ViT-B-32" and cfg.clip.pretrained == "openai"
    assert cfg.adapter.lr == pytest.approx(1e-4)
    # its own
    assert cfg.miner.topk == 300
    assert cfg.model.box_detections_per_img == 300
    assert cfg.model.box_score_thresh == pytest.approx(1e-4)
    assert cfg.train.schedule == "2x"


# --- the COCO detector -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_model():
    torch.manual_seed(0)
    cfg = load_config(COCO, SMALL)
    return build_detector(cfg.model, 512)


def test_coco_model_eval_forward(coco_model):
    coco_model.eval()
    coco_model.set_vocabulary(torch.randn(65, 512))
    with torch.no_grad():
        out = coco_model([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))])
    assert isinstance(out, list) and len(out) == 1
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}  # model.mask_head: true (as EZAD)
    n = len(out[0]["scores"])
    assert out[0]["boxes"].shape == (n, 4) and out[0]["labels"].shape == (n,)
    assert out[0]["masks"].shape == (n, 1, 64, 64)
    assert ((out[0]["labels"] >= 1) & (out[0]["labels"] <= 65)).all()
    assert coco_model.embed_dim == 512
    assert coco_model.backbone.out_channels == 256


def test_coco_model_frozen_stages(coco_model):
    body = coco_model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    grads = {}
    for name, p in body.named_parameters():
        grads.setdefault(name.split(".")[0], set()).add(p.requires_grad)
    assert grads["conv1"] == {False} and grads["layer1"] == {False}
    assert grads["layer2"] == grads["layer3"] == grads["layer4"] == {True}
    # everything after the backbone body trains
    assert all(p.requires_grad for p in coco_model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in coco_model.roi_heads.parameters())


# --- the LVIS detector -----------------------------------------------------------------------------
def test_lvis_config_builds_its_detector_and_shares_the_coco_clip():
    """The LVIS config is built, not only loaded: its R50-FPN detector with LVIS's own detection
    settings runs a forward pass over an LVIS-sized vocabulary (1,203 classes). Its CLIP section
    is the COCO config's (inherited), which test_coco_clip_builds_random_vit_b_32 builds."""
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    cfg = load_config(LVIS, SMALL)
    assert OmegaConf.to_container(cfg.clip) == OmegaConf.to_container(load_config(COCO).clip)
    model = build_detector(cfg.model, 512)
    assert model.roi_heads.detections_per_img == 300
    assert model.roi_heads.score_thresh == pytest.approx(1e-4)
    assert model.backbone.out_channels == 256
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    model.eval()
    model.set_vocabulary(torch.nn.functional.normalize(torch.randn(1203, 512), dim=-1))
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))])
    n = len(out[0]["scores"])
    assert 0 < n <= 300 and out[0]["boxes"].shape == (n, 4) and out[0]["masks"].shape == (n, 1, 64, 64)
    assert ((out[0]["labels"] >= 1) & (out[0]["labels"] <= 1203)).all()


def test_backbone_weights_file_loads(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet50(weights=None)
    for m in ref.modules():  # non-trivial BN statistics, so that they are checked too
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    state = ref.state_dict()
    torch.save(state, tmp_path / "r50.pth")
    cfg = load_config(COCO, [*SMALL, f"model.backbone_weights={tmp_path / 'r50.pth'}"])
    body = build_detector(cfg.model, 512).backbone.body.state_dict()
    assert len(body) > 0
    for k, v in body.items():
        assert torch.equal(v, state[k]), k
    assert {k.split(".")[0] for k in body} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}


def test_backbone_weights_of_unrelated_tensors_are_refused(tmp_path):
    torch.save({"encoder.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}, tmp_path / "other.pth")
    cfg = load_config(COCO, [*SMALL, f"model.backbone_weights={tmp_path / 'other.pth'}"])
    with pytest.raises(OvdError, match="match none"):
        build_detector(cfg.model, 512)


def test_backbone_weights_of_another_resnet_are_refused(tmp_path):
    """ResNet-18 weights for the ResNet-50 config: same parameter names, other shapes."""
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cfg = load_config(COCO, [*SMALL, f"model.backbone_weights={tmp_path / 'r18.pth'}"])
    with pytest.raises(OvdError, match="r18.pth"):
        build_detector(cfg.model, 512)


def test_missing_backbone_weights_file_is_an_error(tmp_path):
    cfg = load_config(COCO, [*SMALL, f"model.backbone_weights={tmp_path / 'none.pth'}"])
    with pytest.raises(OvdError, match="not found"):
        build_detector(cfg.model, 512)


# --- build_backbone vs torchvision -----------------------------------------------------------------
@pytest.mark.parametrize("trainable", [0, 3, 5])
def test_build_backbone_equals_torchvision(trainable):
    torch.manual_seed(7)
    ours, anchors = build_backbone("resnet18_fpn_small", trainable)
    torch.manual_seed(7)
    ref = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=trainable, returned_layers=[2, 3, 4]
    )
    assert len(anchors) == 4 and ours.out_channels == ref.out_channels == 256
    po, pr = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert po.keys() == pr.keys()
    for k in po:
        assert torch.equal(po[k], pr[k]), k
        assert po[k].requires_grad == pr[k].requires_grad, k
    bo, br = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert bo.keys() == br.keys() and all(torch.equal(bo[k], br[k]) for k in bo)
    assert sum(p.requires_grad for p in po.values()) > 0  # the FPN always trains
    ours.eval(), ref.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        yo, yr = ours(x), ref(x)
    assert list(yo) == list(yr) == ["0", "1", "2", "pool"]
    for k in yo:
        assert torch.equal(yo[k], yr[k]), k


def test_build_backbone_norm_and_width():
    bb, _ = build_backbone("resnet18_fpn_small", 5, norm="bn", fpn_channels=64)
    kinds = {type(m) for m in bb.body.modules()}
    assert nn.BatchNorm2d in kinds and FrozenBatchNorm2d not in kinds
    assert all(p.requires_grad for p in bb.body.parameters())  # bn1 included at 5 trainable layers
    assert bb.out_channels == 64
    bb.eval()
    with torch.no_grad():
        out = bb(torch.rand(1, 3, 64, 64))
    assert all(v.shape[1] == 64 for v in out.values())
    frozen, _ = build_backbone("resnet18_fpn_small", 3)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.body.modules())
    with pytest.raises(OvdError, match="unknown model.norm 'gn'"):
        build_backbone("resnet18_fpn_small", 3, norm="gn")
    with pytest.raises(OvdError, match="0-5"):
        build_backbone("resnet18_fpn_small", 6)


# --- the COCO CLIP ---------------------------------------------------------------------------------
def test_coco_clip_builds_random_vit_b_32():
    cfg = load_config(COCO, ["clip.pretrained="])
    assert cfg.clip.pretrained == ""
    clip = clip_from_config(cfg.clip)
    assert clip.embed_dim == 512
    assert clip.image_size == 224
    assert clip.source == "ViT-B-32/random-init"
    text = clip.encode_text(["cat", "dog"], list(cfg.clip.templates))
    assert text.shape == (2, 512)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


# --- LVIS v1 image paths ---------------------------------------------------------------------------
def test_lvis_image_path_from_coco_url(tmp_path):
    data = {
        "categories": [
            {"id": 1, "name": "aardvark", "frequency": "r", "synset": "aardvark.n.01"},
            {"id": 2, "name": "abacus", "frequency": "c", "synset": "abacus.n.01"},
            {"id": 3, "name": "accordion", "frequency": "f", "synset": "accordion.n.01"},
        ],
        "images": [
            {
                "id": 1,
                "width": 640,
                "height": 480,
                "neg_category_ids": [2],
                "not_exhaustive_category_ids": [],
                "coco_url": "http://images.cocodataset.org/val2017/000000000001.jpg",
            },
            {
                "id": 9,
                "width": 320,
                "height": 240,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [3],
                "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg",
            },
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "area": 1200.0},
            {"id": 2, "image_id": 9, "category_id": 3, "bbox": [5.0, 5.0, 10.0, 10.0], "area": 100.0},
        ],
    }
    path = tmp_path / "ann" / "lvis_v1_val.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    root = tmp_path / "coco"
    ds = load_detection_dataset(path, root)
    assert ds.is_lvis
    rec = ds.record(0)
    assert rec["path"] == root / "val2017" / "000000000001.jpg"
    assert rec["image_id"] == 1 and rec["boxes"] == [[10.0, 20.0, 40.0, 60.0]] and rec["labels"] == [1]
    assert ds.record(1)["path"] == root / "train2017" / "000000000009.jpg"
    # without an image root, paths are relative to the annotation file's folder
    assert load_detection_dataset(path).record(0)["path"] == path.parent / "val2017" / "000000000001.jpg"


def test_imagenet_backbone_weights_come_from_torchvision(monkeypatch):
    # "imagenet" asks torchvision's weight enum (hub cache / download) for the state dict
    import torchvision

    from ovd.modeling.backbones import build_backbone

    ref = torchvision.models.resnet18(weights=None).state_dict()
    ref = {k: v + 1.0 if v.is_floating_point() else v for k, v in ref.items()}
    seen = {}

    def fake_get_state_dict(self, *a, **k):
        seen["url"] = self.url
        return ref

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    bb, _ = build_backbone("resnet18_fpn_small", weights="imagenet")
    assert "resnet18" in seen["url"]
    assert torch.equal(bb.body.layer4[0].conv1.weight, ref["layer4.0.conv1.weight"])


def test_imagenet_backbone_weights_offline_is_one_clear_error(monkeypatch):
    import urllib.error

    import torchvision

    from ovd.modeling.backbones import build_backbone

    def offline(self, *a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(OvdError, match="backbone_weights=FILE"):
        build_backbone("resnet50_fpn", weights="imagenet")
