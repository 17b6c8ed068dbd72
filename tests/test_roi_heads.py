"""OVRoIHeads in parts: extra (already pooled) RoIs with teacher targets, sampling without the sampler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _fixtures import TINY_D as D
from _fixtures import TINY_GT, tiny_detector, tiny_images
from _fixtures import tiny_targets as targets
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

from ovd.errors import OvdError
from ovd.modeling.detector import OVFasterRCNN
from ovd.modeling.roi_heads import ExtraRoIs, RoIBatch

C = 4  # vocabulary size
FPN = 32
IMAGES = tiny_images()


def make_model(seed: int = 0, distill_weight: float = 1.0) -> OVFasterRCNN:
    return tiny_detector(seed, fpn_channels=FPN, representation_size=64, vocabulary=C, distill_weight=distill_weight)


def inputs(m: OVFasterRCNN, images=IMAGES, tg=None):
    """Backbone features, image sizes and transformed targets (128 px images: boxes unchanged)."""
    images_t, targets_t = m.transform(images, tg if tg is not None else targets()[: len(images)])
    return m.backbone(images_t.tensors), images_t.image_sizes, targets_t


def keep_all(m: OVFasterRCNN) -> None:
    """A sampler that keeps every positive and negative: sampling is deterministic."""
    m.roi_heads.fg_bg_sampler = BalancedPositiveNegativeSampler(10**6, 1.0)


# --- extra RoIs ------------------------------------------------------------------------------------------
def test_extra_pooled_features_give_the_losses_of_the_same_boxes_as_sampled_proposals():
    m = make_model().train()
    keep_all(m)
    rh = m.roi_heads
    feats, sizes, tg = inputs(m, IMAGES[:1])
    # as sampled proposals: no RPN proposals, so the sampled RoIs are exactly the GT boxes (label = own class)
    _, sampled = rh(feats, [torch.zeros(0, 4)], sizes, tg)
    # the same boxes pooled here and fed after RoI pooling, with their labels, and no image at all
    pooled = rh.box_roi_pool(feats, [tg[0]["boxes"]], sizes)
    assert pooled.shape == (3, FPN, 7, 7)
    _, extra = rh({}, [], [], None, extra_rois=ExtraRoIs(pooled, tg[0]["labels"]))
    assert torch.equal(extra["loss_classifier"], sampled["loss_classifier"])
    assert sampled["loss_box_reg"] > 0 and extra["loss_box_reg"] == 0  # extra RoIs have no box to regress
    assert set(extra) == {"loss_classifier", "loss_box_reg"}


def test_classification_covers_sampled_and_extra_rois_box_regression_only_sampled():
    m = make_model().train()
    keep_all(m)
    rh = m.roi_heads
    feats, sizes, tg = inputs(m)
    proposals = [torch.zeros(0, 4), torch.zeros(0, 4)]
    _, both = rh(feats, proposals, sizes, tg)  # two images, GT boxes as the sampled RoIs
    f1, s1, t1 = inputs(m, IMAGES[:1])
    _, first = rh(f1, proposals[:1], s1, t1)  # the first image alone
    # the first image sampled + the second image's GT boxes as extra pooled RoIs
    pooled2 = rh.box_roi_pool(feats, [torch.zeros(0, 4), tg[1]["boxes"]], sizes)
    _, mixed = rh(f1, proposals[:1], s1, t1, extra_rois=ExtraRoIs(pooled2, tg[1]["labels"]))
    # one cross-entropy over 3 sampled + 2 extra RoIs = the two-image loss over 5 sampled RoIs
    assert torch.allclose(mixed["loss_classifier"], both["loss_classifier"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed["loss_classifier"], first["loss_classifier"])
    # box regression: the sampled RoIs only, normalised by their number (extra RoIs do not dilute it)
    assert torch.allclose(mixed["loss_box_reg"], first["loss_box_reg"], rtol=1e-5, atol=1e-7)


def test_parts_reproduce_forward():
    m = make_model().train()
    rh = m.roi_heads
    images_t, tg = m.transform(IMAGES, targets(distill=True))
    feats, sizes = m.backbone(images_t.tensors), images_t.image_sizes
    torch.manual_seed(4)
    props, _ = m.rpn(images_t, feats, tg)
    torch.manual_seed(5)
    _, losses = rh(feats, props, sizes, tg)
    torch.manual_seed(5)
    batch = rh.pool_rois(feats, props, sizes, tg)
    outputs = rh.predict(batch)
    parts = rh.compute_losses(batch, outputs, tg)
    assert set(parts) == set(losses) == {"loss_classifier", "loss_box_reg", "loss_distill"}
    assert all(torch.equal(parts[k], losses[k]) for k in losses)
    assert batch.distill and int(batch.is_proposal.sum()) == outputs.rois.logits.shape[0]
    assert outputs.distill_embeddings.shape == (4, D)  # 2 cached boxes × 2 images


def test_teacher_loss_is_zero_for_the_student_itself_and_positive_otherwise():
    m = make_model().train()
    rh = m.roi_heads
    feats, sizes, tg = inputs(m)
    pooled = rh.box_roi_pool(feats, [tg[0]["boxes"], tg[1]["boxes"]], sizes).detach()
    labels = torch.cat([tg[0]["labels"], tg[1]["labels"]])
    with torch.no_grad():
        own = rh.predict(RoIBatch([]), ExtraRoIs(pooled, labels)).extra
    same = ExtraRoIs(pooled, labels, own.embeddings, own.logits, own.deltas)
    _, losses = rh({}, [], [], None, extra_rois=same)
    teacher_keys = {"loss_teacher_embedding", "loss_teacher_logits", "loss_teacher_deltas"}
    assert teacher_keys <= set(losses)
    assert all(losses[k].item() == 0.0 for k in teacher_keys)

    teacher = make_model(seed=1).train().roi_heads  # another (frozen) head on the same features
    with torch.no_grad():
        t = teacher.predict(RoIBatch([]), ExtraRoIs(pooled, labels)).extra
    for w in (1.0, 2.0):
        extra = ExtraRoIs(pooled, labels, t.embeddings, t.logits, t.deltas, teacher_weight=w)
        _, lw = rh({}, [], [], None, extra_rois=extra)
        if w == 1.0:
            assert all(lw[k].item() > 0 for k in teacher_keys)
            one = lw
        else:
            assert all(torch.allclose(lw[k], 2 * one[k]) for k in teacher_keys)
    # embedding term: mean over RoIs of the L1 distance between unit embeddings
    expected = (own.embeddings - t.embeddings).abs().sum(dim=1).mean()
    assert one["loss_teacher_embedding"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert one["loss_teacher_logits"].item() == pytest.approx(F.mse_loss(own.logits, t.logits).item(), rel=1e-5)
    # the teacher terms train the student's head (and only them: logits alone here)
    rh.zero_grad()
    _, only_logits = rh({}, [], [], None, extra_rois=ExtraRoIs(pooled, labels, teacher_logits=t.logits))
    assert "loss_teacher_embedding" not in only_logits
    only_logits["loss_teacher_logits"].backward()
    assert rh.classifier.proj.weight.grad.abs().sum() > 0 and rh.box_head.fc6.weight.grad.abs().sum() > 0
    assert rh.regressor.fc.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())


def test_model_forward_accepts_extra_rois_and_backpropagates_into_them():
    m = make_model().train()
    feats = torch.randn(5, FPN, 7, 7, requires_grad=True)  # e.g. a generator's forged RoI features
    extra = ExtraRoIs(feats, torch.tensor([0, 1, 2, 3, 4]), teacher_logits=torch.randn(5, 1 + C))
    torch.manual_seed(0)
    losses = m(IMAGES, targets(distill=True), extra_rois=extra)
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_distill",
        "loss_teacher_logits",
    }
    sum(losses.values()).backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_extra_rois_are_checked():
    m = make_model().train()
    rh = m.roi_heads
    ok = torch.zeros(2, FPN, 7, 7)
    feats, sizes, tg = inputs(m)
    props = [torch.zeros(0, 4), torch.zeros(0, 4)]
    with pytest.raises(OvdError, match="do not fit the RoI pooling"):
        rh(feats, props, sizes, tg, extra_rois=ExtraRoIs(torch.zeros(2, FPN + 1, 7, 7), torch.tensor([1, 2])))
    with pytest.raises(OvdError, match="pooled"):
        rh({}, [], [], None, extra_rois=ExtraRoIs(torch.zeros(2, FPN * 49), torch.tensor([1, 2])))
    with pytest.raises(OvdError, match=f"0..{C}"):
        rh({}, [], [], None, extra_rois=ExtraRoIs(ok, torch.tensor([1, C + 1])))
    with pytest.raises(OvdError, match="int64"):
        rh({}, [], [], None, extra_rois=ExtraRoIs(ok, torch.tensor([1.0, 2.0])))
    with pytest.raises(OvdError, match="same vocabulary"):
        rh({}, [], [], None, extra_rois=ExtraRoIs(ok, torch.tensor([1, 2]), teacher_logits=torch.zeros(2, C)))
    with pytest.raises(OvdError, match="no RoIs"):
        rh({}, [], [], None)
    with pytest.raises(OvdError, match="training input"):
        rh.eval()({}, [], [], None, extra_rois=ExtraRoIs(ok, torch.tensor([1, 2])))


# --- sampling without the random sampler (the replay data watchers) --------------------------------------
def test_sample_rois_without_subsampling_drops_ignored_proposals():
    m = make_model().train()
    rh = m.roi_heads
    rh.proposal_matcher = Matcher(0.7, 0.3, allow_low_quality_matches=False)
    gt = torch.tensor(TINY_GT[0][:1])  # 40 × 50 box at (10, 10)
    props = [torch.tensor([[10.0, 10.0, 50.0, 60.0], [10.0, 10.0, 40.0, 60.0], [100.0, 100.0, 120.0, 120.0]])]
    # IoUs with the GT box: 1.0 (fg), 0.75 (fg), 0.0 (bg); the GT box itself joins as a proposal
    _, _, labels, _ = rh.sample_rois(props, [{"boxes": gt, "labels": torch.tensor([2])}], subsample=False)
    assert labels[0].tolist() == [2, 2, 0, 2]
    props[0][1] = torch.tensor([10.0, 10.0, 35.0, 60.0])  # IoU 0.625: between the thresholds → dropped
    p, _, labels, _ = rh.sample_rois(props, [{"boxes": gt, "labels": torch.tensor([2])}], subsample=False)
    assert labels[0].tolist() == [2, 0, 2] and len(p[0]) == 3
