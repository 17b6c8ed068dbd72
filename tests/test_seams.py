"""The detector's seams: features_and_proposals + the RoI heads in parts give torchvision's single
forward bit for bit; the seeded initialisation is the one ovd had when it replaced a stock FasterRCNN's
RoI heads; torchvision's target checks; the replay watchers' RoI record built from the parts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _fixtures import TINY_D as D
from _fixtures import TINY_GT, TINY_LABELS, tiny_detector, tiny_images, tiny_targets
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from ovd.errors import OvdError
from ovd.modeling.backbones import build_backbone
from ovd.modeling.roi_heads import ExtraRoIs, OVRoIHeads
from ovd.modeling.semantic_regression import SemanticBoxRegressor
from ovd.modeling.zero_shot_classifier import ZeroShotClassifier
from ovd.replay.watchers import ClassStats, collect_stats, roi_record

C = 4


def model(seed: int = 0, **kw):
    return tiny_detector(seed, fpn_channels=32, representation_size=64, vocabulary=C, **kw)


def _train_pass(forward, m, images, targets):
    torch.manual_seed(0)
    losses = forward(m, images, targets)
    m.zero_grad()
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("mask_head", [False, True])
def test_forward_equals_torchvisions_single_forward(mask_head):
    """On a fixed seed: the same losses, gradients and detections as torchvision's
    GeneralizedRCNN.forward (transform → backbone → RPN → roi_heads → postprocess) on the same model
    (128 px images: the distillation-box rescaling ovd adds is the identity here)."""
    images = tiny_images()
    m = model(mask_head=mask_head).train()
    tg = tiny_targets(distill=True, masks=mask_head)
    ours, g_ours = _train_pass(type(m).__call__, m, images, tg)
    ref, g_ref = _train_pass(GeneralizedRCNN.forward, m, images, tg)
    assert ours.keys() == ref.keys() and ("loss_mask" in ours) == mask_head
    assert all(torch.equal(ours[k], ref[k]) for k in ours)
    assert g_ours.keys() == g_ref.keys() and all(torch.equal(g_ours[k], g_ref[k]) for k in g_ours)
    m.eval()
    big = tiny_images(size=160)  # resized to 128 and the boxes (and masks) back to 160
    with torch.no_grad():
        for imgs in (images, big):
            a, b = m(imgs), GeneralizedRCNN.forward(m, imgs)
            for da, db in zip(a, b):
                assert da.keys() == db.keys() and ("masks" in da) == mask_head
                assert all(torch.equal(da[k], db[k]) for k in da)


def test_the_two_seams_reproduce_the_forward():
    images, tg = tiny_images(), tiny_targets(distill=True)
    m = model().train()
    extra = ExtraRoIs(torch.randn(3, 32, 7, 7), torch.tensor([0, 1, 2]))
    torch.manual_seed(0)
    full = m(images, tg, extra_rois=extra)
    torch.manual_seed(0)
    s = m.features_and_proposals(images, tg)
    heads = m.roi_heads
    batch = heads.pool_rois(s.features, s.proposals, s.images.image_sizes, s.targets)
    parts = {**s.losses, **heads.compute_losses(batch, heads.predict(batch, extra), s.targets, extra)}
    assert parts.keys() == full.keys() and all(torch.equal(parts[k], full[k]) for k in full)
    assert set(s.losses) == {"loss_objectness", "loss_rpn_box_reg"}
    assert torch.equal(tg[0]["boxes"], torch.tensor(TINY_GT[0]))  # the caller's targets are untouched
    m.eval()
    with torch.no_grad():
        full = m(images)
        s = m.features_and_proposals(images)
        batch = heads.pool_rois(s.features, s.proposals, s.images.image_sizes)
        dets = heads.detections(batch, heads.predict(batch), s.images.image_sizes)
        dets = m.transform.postprocess(dets, s.images.image_sizes, s.original_sizes)
    assert s.targets is None and s.losses == {}
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full, dets) for k in a)


def test_initialisation_is_that_of_a_stock_fasterrcnn_with_replaced_heads():
    """The model is assembled from torchvision's parts without a stock RoIHeads, yet a seed gives the
    weights it gave when ovd built torchvision's FasterRCNN and replaced its RoI heads."""
    ours = tiny_detector(5, fpn_channels=32, representation_size=64)  # seeds itself
    after_ours = torch.rand(4)
    torch.manual_seed(5)
    bb, anchors = build_backbone("resnet18_fpn_small", trainable_layers=5, fpn_channels=32)
    ref = FasterRCNN(bb, num_classes=2, min_size=128, max_size=128, box_head=TwoMLPHead(32 * 49, 64),
                     rpn_anchor_generator=AnchorGenerator(anchors, ((0.5, 1.0, 2.0),) * len(anchors)),
                     rpn_batch_size_per_image=32, box_batch_size_per_image=32)  # fmt: skip
    stock = ref.roi_heads
    ref.roi_heads = OVRoIHeads(stock.box_roi_pool, stock.box_head, ZeroShotClassifier(64, D),
                               SemanticBoxRegressor(64, D), batch_size_per_image=32, fg_iou_thresh=0.5,
                               bg_iou_thresh=0.5, positive_fraction=0.25, bbox_reg_weights=None, score_thresh=0.0,
                               nms_thresh=0.5, detections_per_img=100)  # fmt: skip
    assert torch.equal(torch.rand(4), after_ours)  # the same random numbers drawn, the same left
    so, sr = ours.state_dict(), ref.state_dict()
    assert so.keys() == sr.keys() and all(torch.equal(so[k], sr[k]) for k in so)


def test_torchvisions_target_checks_are_one_clear_error():
    m = model().train()
    images = tiny_images()
    with pytest.raises(OvdError, match="training mode needs targets"):
        m(images)
    bad = tiny_targets()
    bad[1]["boxes"] = torch.tensor([[5.0, 5.0, 40.0, 40.0], [50.0, 50.0, 50.0, 110.0]])  # zero width
    with pytest.raises(OvdError, match=r"target 1: every box needs a positive width and height.*box 1 is \[50.0"):
        m(images, bad)
    bad[1]["boxes"] = torch.tensor([5.0, 5.0, 40.0, 40.0])
    with pytest.raises(OvdError, match=r"target 1: 'boxes' must be a tensor of shape \(N, 4\), got \(4,\)"):
        m(images, bad)
    bad = tiny_targets()
    bad[0]["labels"] = torch.tensor([1, 2])
    with pytest.raises(OvdError, match=r"target 0: 'labels' must be a tensor of shape \(3,\)"):
        m(images, bad)
    bad = tiny_targets(masks=True)
    bad[0]["masks"] = bad[0]["masks"][:, :64]
    with pytest.raises(OvdError, match=r"target 0: 'masks' must be a tensor of shape \(3, 128, 128\)"):
        m(images, bad)
    with pytest.raises(OvdError, match="2 image"):
        m(images, tiny_targets()[:1])
    with pytest.raises(OvdError, match="no 'labels'"):
        m.roi_heads.check_targets([{"boxes": torch.zeros(0, 4)}])


def test_watchers_record_every_matched_roi_from_the_parts():
    m = model().eval()
    images, tg = tiny_images(), tiny_targets()
    with torch.no_grad():
        dets = m(images)
    rec = roi_record(m, images, tg)
    with torch.no_grad():
        again = m(images)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(dets, again) for k in a)  # nothing of the model changed
    assert set(rec) == {"pooled", "fc6", "fc7", "embedding", "logits", "boxes", "image_index", "labels",
                        "matched_idxs"}  # fmt: skip
    assert ClassStats.layers_of(rec) == ["pooled", "fc6", "fc7", "embedding"]
    assert not any(v.requires_grad for v in rec.values())
    n = len(rec["labels"])
    assert rec["pooled"].shape == (n, 32, 7, 7) and rec["fc7"].shape == (n, 64) and rec["logits"].shape == (n, 1 + C)
    # every GT box is among the RoIs, labelled with its own class and matched to itself
    for i, (boxes, labels) in enumerate(zip(TINY_GT, TINY_LABELS)):
        for j, (b, lab) in enumerate(zip(boxes, labels)):
            row = ((rec["boxes"] == torch.tensor(b)).all(dim=1) & (rec["image_index"] == i)).nonzero()
            assert len(row) >= 1 and rec["labels"][row[0, 0]] == lab and rec["matched_idxs"][row[0, 0]] == j
    # all matched proposals kept (no subsampling), foreground and background
    assert (rec["labels"] == 0).sum() > 0 and (rec["labels"] > 0).sum() >= 5
    assert len(roi_record(m, images, tg, subsample=True)["labels"]) <= 2 * 32 < n
    # the layers are the box head's own: pooled → fc6 → relu → fc7 → relu → embedding → logits
    rh = m.roi_heads
    with torch.no_grad():
        assert torch.allclose(rh.box_head.fc6(rec["pooled"].flatten(1)), rec["fc6"], atol=1e-5)
        assert torch.allclose(rh.box_head.fc7(F.relu(rec["fc6"])), rec["fc7"], atol=1e-5)
        emb = rh.classifier.embed(F.relu(rec["fc7"]))
        assert torch.allclose(emb, rec["embedding"], atol=1e-6)
        assert torch.allclose(rh.classifier(emb), rec["logits"], atol=1e-5)


def test_collect_stats_sums_the_records_of_each_image():
    m = model().eval()
    images, tg = tiny_images(), tiny_targets()

    class Two:
        def __len__(self):
            return 2

        def get(self, i):
            return images[i], tg[i]

    st = collect_stats(m, Two(), C, progress=False).tensors()
    recs = [roi_record(m, [images[i]], [tg[i]]) for i in range(2)]
    labels = torch.cat([r["labels"] for r in recs])
    assert torch.equal(st["rois"], torch.bincount(labels, minlength=C + 1))
    x = torch.cat([r["fc7"] for r in recs]).double()
    for c in labels.unique().tolist():
        torch.testing.assert_close(st["fc7.mean"][c], x[labels == c].mean(0).float())
