"""The class-agnostic mask branch (model.mask_head): training on GT masks, masks for every detection
(any class, novel ones too) at the image's size, checkpoints with and without it, the configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures import TINY_D as D
from _fixtures import tiny_detector, tiny_images, tiny_targets
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from ovd.config import load_config
from ovd.config_schema import ModelConfig
from ovd.errors import OvdError
from ovd.modeling.build import build_detector
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
C = 4  # base vocabulary of the tiny targets


def model(seed: int = 0, **kw):
    return tiny_detector(seed, fpn_channels=32, representation_size=64, vocabulary=C, mask_head=True, **kw)


def test_mask_branch_is_torchvisions_with_one_channel():
    rh = model().roi_heads
    assert rh.has_mask() and isinstance(rh.mask_head, MaskRCNNHeads)
    assert isinstance(rh.mask_predictor, MaskRCNNPredictor)
    assert rh.mask_roi_pool.output_size == (14, 14) and rh.mask_predictor.mask_fcn_logits.out_channels == 1
    assert not tiny_detector(0, fpn_channels=32, representation_size=64).roi_heads.has_mask()
    convs = [mod for mod in rh.mask_head.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [256] * 4 and rh.mask_predictor.conv5_mask.out_channels == 256
    narrow = model(mask_channels=16).roi_heads
    convs = [mod for mod in narrow.mask_head.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16] * 4 and narrow.mask_predictor.mask_fcn_logits.in_channels == 16


def test_loss_mask_decreases_over_a_few_steps():
    m = model().train()
    images, tg = tiny_images(), tiny_targets(masks=True)
    mask_params = [p for n, p in m.named_parameters() if ".mask_" in n]
    for n, p in m.named_parameters():  # the mask branch alone learns (and is back-propagated): fast
        p.requires_grad_(".mask_" in n)
    opt = torch.optim.Adam(mask_params, lr=1e-3)
    torch.manual_seed(0)
    seen = []
    for _ in range(12):
        losses = m(images, tg)
        assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
        opt.zero_grad()
        losses["loss_mask"].backward()
        opt.step()
        seen.append(losses["loss_mask"].item())
    assert seen[-1] < 0.7 * seen[0], seen


def test_eval_gives_every_detection_a_mask_at_the_input_size():
    m = model().eval()
    images = [torch.rand(3, 160, 200), torch.rand(3, 96, 128)]  # resized to 128 and back
    with torch.no_grad():
        out = m(images)
    for img, o in zip(images, out):
        n = len(o["boxes"])
        assert n > 0 and o["masks"].shape == (n, 1, *img.shape[-2:]) and o["masks"].dtype == torch.float32
        assert o["masks"].min() >= 0 and o["masks"].max() <= 1
        # pasted in the box: nothing outside it (1 px of interpolation slack)
        x0, y0, x1, y1 = o["boxes"][0].tolist()
        outside = o["masks"][0, 0].clone()
        outside[max(0, int(y0) - 1) : int(y1) + 2, max(0, int(x0) - 1) : int(x1) + 2] = 0
        assert outside.max() == 0


def test_masks_are_class_agnostic_so_novel_names_get_masks():
    m = model().eval()
    images = tiny_images()
    base = m.roi_heads.classifier.text.clone()
    novel = torch.randn(2, D, generator=torch.Generator().manual_seed(11))
    m.set_vocabulary(torch.cat([base, novel]))  # labels 5, 6: names the model never trained on
    with torch.no_grad():
        out = m(images)
        labels = torch.cat([o["labels"] for o in out])
        assert {5, 6} & set(labels.tolist()), "no novel detection to look at"
        for o in out:
            assert o["masks"].shape[0] == len(o["labels"])
        # a box's mask does not depend on its label
        s = m.features_and_proposals(images)
        boxes = [torch.tensor([[10.0, 10.0, 60.0, 70.0], [30.0, 40.0, 110.0, 100.0]])] * 2
        dets = [{"boxes": b, "labels": torch.tensor([1, 2])} for b in boxes]
        novel_dets = [{"boxes": b, "labels": torch.tensor([5, 6])} for b in boxes]
        m.roi_heads.add_masks(s.features, dets, s.images.image_sizes)
        m.roi_heads.add_masks(s.features, novel_dets, s.images.image_sizes)
    assert all(torch.equal(a["masks"], b["masks"]) for a, b in zip(dets, novel_dets))
    assert dets[0]["masks"].shape == (2, 1, 28, 28)


def test_training_needs_masks_unless_mask_training_is_off():
    m = model().train()
    with pytest.raises(OvdError, match="target 0 has no 'masks' \\(the mask head is on: model.mask_head\\)"):
        m(tiny_images(), tiny_targets())
    m.roi_heads.train_masks = False  # e.g. few-shot fine-tuning on box annotations
    losses = m(tiny_images(), tiny_targets())
    assert "loss_mask" not in losses
    sum(losses.values()).backward()
    assert all(p.grad is None for n, p in m.named_parameters() if ".mask_" in n)
    assert m.roi_heads.classifier.proj.weight.grad is not None
    with torch.no_grad():  # eval needs no masks, and still gives them
        assert "masks" in m.eval()(tiny_images(), tiny_targets())[0]


def _save(path, model, model_meta: dict) -> None:
    meta = {"embed_dim": D, "model": model_meta, "base_names": ["a", "b", "c", "d"]}
    save_checkpoint(path, model, None, None, 0, meta)


def test_checkpoints_record_the_mask_head_and_old_ones_load_box_only(tmp_path):
    small = {"backbone": "resnet18_fpn_small", "fpn_channels": 32, "representation_size": 64, "norm": "bn",
             "min_size": 128, "max_size": 128, "trainable_layers": 5}  # fmt: skip
    cfg = ModelConfig(**small, mask_head=True)
    torch.manual_seed(0)
    masked = build_detector(cfg, D)
    masked.set_vocabulary(torch.randn(C, D))
    _save(tmp_path / "mask.pt", masked, {**small, "mask_head": True})
    state = load_checkpoint(tmp_path / "mask.pt")
    again = model_from_checkpoint(state, tmp_path / "mask.pt")
    assert again.has_mask and json.loads(state["meta_json"])["model"]["mask_head"] is True
    assert all(torch.equal(v, masked.state_dict()[k]) for k, v in again.state_dict().items())
    # a checkpoint written before model.mask_head existed: no key, no mask weights → box-only
    old = build_detector(ModelConfig(**small), D)
    old.set_vocabulary(torch.randn(C, D))
    _save(tmp_path / "old.pt", old, small)
    state = load_checkpoint(tmp_path / "old.pt")
    loaded = model_from_checkpoint(state, tmp_path / "old.pt")
    assert not loaded.has_mask and not any("mask" in k for k in state["model"])
    loaded.set_vocabulary(state["text"])
    with torch.no_grad():
        assert "masks" not in loaded(tiny_images())[0]
    # mask weights under a box-only record do not fit: one clear error
    _save(tmp_path / "lying.pt", masked, small)
    with pytest.raises(OvdError, match="weights do not fit the model it records"):
        model_from_checkpoint(load_checkpoint(tmp_path / "lying.pt"), tmp_path / "lying.pt")


def test_on_in_the_coco_and_lvis_configs_off_in_the_mini_presets():
    for cfg in ("configs/coco/ovd_48_17_ezsd.yaml", "configs/lvis/ovd_rare_ezsd.yaml"):
        assert load_config(REPO / cfg).model.mask_head is True, cfg
    for cfg in sorted((REPO / "configs/mini").rglob("*.yaml")):
        assert load_config(cfg).model.mask_head is False, cfg
