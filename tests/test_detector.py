"""The open-vocabulary Faster R-CNN model: losses, vocabulary swap, semantic regression, distillation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _fixtures import TINY_D as D
from _fixtures import tiny_detector

from ovd.errors import OvdError
from ovd.modeling.backbones import build_backbone
from ovd.modeling.detector import OVFasterRCNN
from ovd.modeling.distillation import DISTILL_BOXES, DISTILL_KEYS, distill_loss, has_distill_targets
from ovd.modeling.semantic_regression import SemanticBoxRegressor
from ovd.modeling.zero_shot_classifier import ZeroShotClassifier


def make_model(semantic: bool = True, distill_weight: float = 1.0, seed: int = 0) -> OVFasterRCNN:
    return tiny_detector(seed, semantic_regression=semantic, distill_weight=distill_weight)


def targets(n_distill: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 100.0, 70.0]]),
            "labels": torch.tensor([1, 3]),
            "distill_boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [70.0, 70.0, 110.0, 120.0], [0, 0, 30, 30]])[
                :n_distill
            ],
            "distill_embeddings": torch.randn(3, D, generator=g)[:n_distill],
            "distill_weights": torch.tensor([1.0, 0.5, 0.25])[:n_distill],
        }
    ]


IMAGES = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(2))]


def test_training_losses_are_finite_and_backpropagate():
    m = make_model()
    m.set_vocabulary(torch.randn(4, D))
    m.train()
    losses = m(IMAGES, targets())
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_distill"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    clf = m.roi_heads.classifier
    assert clf.proj.weight.grad is not None and clf.background.grad is not None and clf.logit_scale.grad is not None
    assert m.roi_heads.regressor.fc.weight.grad is not None


def _separate_distill_loss(m, feats, targets_t, image_sizes):
    """The distillation loss from its own pooling pass over the cached boxes (reference)."""
    rh = m.roi_heads
    emb = rh.classifier.embed(rh.box_head(rh.box_roi_pool(feats, [t[DISTILL_BOXES] for t in targets_t], image_sizes)))
    return distill_loss(emb, targets_t)


def test_distillation_loss_is_weighted_l1_of_unit_embeddings():
    m = make_model()
    m.set_vocabulary(torch.randn(4, D))
    m.train()
    t = targets()
    rh = m.roi_heads
    # the model rescales distill boxes with the image; 128 px in, 128 px out: identity here
    images_t, targets_t = m.transform(IMAGES, t)
    feats = m.backbone(images_t.tensors)
    loss = _separate_distill_loss(m, feats, targets_t, images_t.image_sizes)
    emb = rh.classifier.embed(
        rh.box_head(rh.box_roi_pool(feats, [targets_t[0]["distill_boxes"]], images_t.image_sizes))
    )
    clip = F.normalize(t[0]["distill_embeddings"], dim=-1)
    w = t[0]["distill_weights"]
    expected = (w[:, None] * (emb - clip).abs()).sum() / w.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # no cached boxes → zero, not NaN; the switch in config (distill_weight 0) removes the term
    none = targets(0)
    images_t, targets_t = m.transform(IMAGES, none)
    assert _separate_distill_loss(m, m.backbone(images_t.tensors), targets_t, images_t.image_sizes).item() == 0.0
    torch.manual_seed(0)
    assert m(IMAGES, none)["loss_distill"].item() == 0.0
    off = make_model(distill_weight=0.0)
    off.set_vocabulary(torch.randn(4, D))
    off.train()
    assert "loss_distill" not in off(IMAGES, targets())


def test_distill_keys_are_the_named_constants():
    assert DISTILL_KEYS == ("distill_boxes", "distill_embeddings", "distill_weights")
    assert set(DISTILL_KEYS) <= set(targets()[0])
    assert has_distill_targets(targets()) and not has_distill_targets([]) and not has_distill_targets(None)


def test_distill_boxes_are_resized_with_the_image(monkeypatch):
    m = make_model()
    m.set_vocabulary(torch.randn(4, D))
    m.train()
    seen = {}
    real = m.roi_heads.forward

    def spy(features, proposals, image_shapes, tg=None):
        seen["boxes"] = tg[0]["distill_boxes"].clone()
        seen["gt"] = tg[0]["boxes"].clone()
        return real(features, proposals, image_shapes, tg)

    monkeypatch.setattr(m.roi_heads, "forward", spy)
    big = [torch.rand(3, 256, 256)]  # resized to 128: boxes halve, like the GT boxes
    t = targets()
    m(big, t)
    assert torch.allclose(seen["boxes"], t[0]["distill_boxes"] / 2)
    assert torch.allclose(seen["gt"], t[0]["boxes"] / 2)
    assert torch.equal(t[0]["distill_boxes"], targets()[0]["distill_boxes"])  # the caller's dict is untouched


def test_one_pooling_pass_gives_the_same_distillation_loss_as_a_separate_pass():
    # forward pools proposals and cached boxes together; the loss must equal a pass of their own
    m = make_model(distill_weight=0.5)
    m.set_vocabulary(torch.randn(4, D))
    m.train()
    t = targets() + targets()  # two images: the split between proposals and cached boxes is per image
    images = IMAGES + [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(5))]
    images_t, targets_t = m.transform(images, t)
    feats = m.backbone(images_t.tensors)
    torch.manual_seed(3)
    proposals, _ = m.rpn(images_t, feats, targets_t)
    separate = 0.5 * _separate_distill_loss(m, feats, targets_t, images_t.image_sizes)
    _, losses = m.roi_heads(feats, proposals, images_t.image_sizes, targets_t)
    assert torch.allclose(losses["loss_distill"], separate, atol=1e-6)


def test_vocabulary_is_data_labels_index_the_current_vocabulary():
    m = make_model().eval()
    m.set_vocabulary(torch.randn(5, D))
    with torch.no_grad():
        out5 = m(IMAGES)[0]
        m.set_vocabulary(torch.randn(2, D))
        out2 = m(IMAGES)[0]
    assert len(out5["labels"]) and len(out2["labels"])
    assert out5["labels"].max() <= 5 and out2["labels"].max() <= 2 and out2["labels"].min() >= 1
    # a vocabulary whose first class is the background direction itself is never preferred over
    # a class aligned with the region embeddings: prompting selects what is detected
    clf = m.roi_heads.classifier
    with torch.no_grad():
        feats = m.backbone(m.transform(IMAGES)[0].tensors)
        props = [torch.tensor([[10.0, 10.0, 60.0, 60.0]])]
        emb = clf.embed(m.roi_heads.box_head(m.roi_heads.box_roi_pool(feats, props, [(128, 128)])))
        logits = clf(emb, classifier=torch.stack([-emb[0], emb[0]]))
    assert logits.shape == (1, 3) and logits[0, 2] > logits[0, 1]


def test_semantic_regression_uses_the_predicted_class_text():
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    sem = SemanticBoxRegressor(16, D, semantic=True)
    plain = SemanticBoxRegressor(16, D, semantic=False)
    t1, t2 = torch.randn(6, D), torch.randn(6, D)
    assert not torch.allclose(sem(x, t1), sem(x, t2))
    assert torch.equal(plain(x, t1), plain(x, t2))
    assert sem.fc.in_features == 16 + D and plain.fc.in_features == 16


def test_class_text_for_regression_follows_labels():
    m = make_model()
    text = F.normalize(torch.randn(3, D), dim=-1)
    m.set_vocabulary(text)
    out = m.roi_heads._class_text(torch.tensor([0, 1, 3]))
    assert torch.equal(out[0], torch.zeros(D)) and torch.allclose(out[1], text[0]) and torch.allclose(out[2], text[2])


def test_vocabulary_errors():
    clf = ZeroShotClassifier(16, D)
    with pytest.raises(OvdError, match="different CLIP"):
        clf.set_vocabulary(torch.randn(3, D + 1))
    with pytest.raises(OvdError, match="empty"):
        clf.set_vocabulary(torch.zeros(0, D))
    with pytest.raises(OvdError, match="no vocabulary"):
        clf(torch.randn(2, D))
    with pytest.raises(OvdError, match="unknown backbone"):
        build_backbone("vgg16")
