"""Pictures of detections (ovd.engine.draw): enlarged, coloured by class, labels that do not overlap."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ovd.engine.draw import PALETTE, class_colour, draw_detections, place_labels, upscale_factor


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])


def _pred(boxes, labels, names, scores, masks=None) -> dict:
    p = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64),
         "names": names, "scores": torch.tensor(scores)}  # fmt: skip
    if masks is not None:
        p["masks"] = masks
    return p


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_crowded_boxes_do_not_overlap_and_stay_inside():
    # twelve near-identical small boxes: every label wants the same place
    boxes = [[60 + k, 60 + k, 90 + k, 90 + k] for k in range(12)]
    sizes = [(70, 16)] * len(boxes)
    spots = place_labels(boxes, sizes, 480, 480)
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(spots, sizes)]
    assert all(0 <= r[0] and r[2] <= 480 and 0 <= r[1] and r[3] <= 480 for r in rects)
    assert not any(_overlap(a, b) for a, b in itertools.combinations(rects, 2))
    assert rects[0][3] <= boxes[0][1]  # the first (best) label sits above its box


def test_label_at_the_top_edge_goes_inside_its_box():
    ((x, y),) = place_labels([[10, 0, 100, 50]], [(40, 16)], 200, 200)
    assert y >= 0 and x == 10


def test_small_image_is_enlarged_and_boxes_coloured_by_class():
    img = torch.full((3, 160, 160), 0.5)
    pred = _pred([[10, 60, 50, 100], [100, 60, 150, 110], [20, 120, 60, 150]], [0, 1, 0],
                 ["red circle", "blue star", "red circle"], [0.9, 0.8, 0.7])  # fmt: skip
    out = draw_detections(img, pred)
    assert out.dtype == torch.uint8 and out.shape == (3, 480, 480) and upscale_factor(160, 160, 480) == 3
    a = out.permute(1, 2, 0).numpy().astype(int)
    for (x1, y1, _x2, y2), lab in zip(pred["boxes"].tolist(), pred["labels"].tolist()):
        # the left edge, below any label: the class colour (same class → same colour)
        col = a[int(y1 * 3) + 20 : int(y2 * 3) - 5, int(x1 * 3) + 1]
        assert (np.abs(col - _rgb(class_colour(lab))).max(axis=1) <= 2).mean() > 0.9
    assert class_colour(0) != class_colour(1) and class_colour(len(PALETTE)) == class_colour(0)
    assert np.abs(a[5, 5] - 128).max() <= 1  # far from every box: the image, enlarged


def test_no_detections_is_the_image_enlarged_and_min_side_zero_keeps_size():
    img = torch.rand(3, 50, 80)
    empty = _pred(np.zeros((0, 4)), [], [], [])
    out = draw_detections(img, empty)
    src = (img * 255).round().to(torch.uint8)
    assert torch.equal(out, src.repeat_interleave(10, 1).repeat_interleave(10, 2))  # short side 50 → x10
    assert draw_detections(img, empty, min_side=0).shape == (3, 50, 80)


def test_masks_are_drawn_when_the_prediction_has_them():
    img = torch.zeros(3, 160, 160)
    masks = torch.zeros(1, 1, 160, 160)
    masks[..., 70:90, 70:90] = 1.0
    pred = _pred([[60, 60, 100, 100]], [2], ["green square"], [0.9], masks)
    a = draw_detections(img, pred).permute(1, 2, 0).numpy().astype(int)
    inside, outside = a[80 * 3, 80 * 3], a[65 * 3, 65 * 3]
    assert inside.sum() > 0 and np.all(outside == 0)
    tint = _rgb(class_colour(2)) * 0.4
    assert np.abs(inside - tint).max() <= 2
