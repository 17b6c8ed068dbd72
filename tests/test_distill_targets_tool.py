"""tools/distill_targets.py: where the distilled boxes lie and what their targets name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import distill_targets  # noqa: E402

from ovd.errors import OvdError  # noqa: E402


def test_boxes_are_grouped_by_their_best_iou_with_any_object():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]])
    novel = torch.tensor([True, False])
    boxes = torch.tensor([[0.0, 0, 10, 9],  # IoU 0.9 with the novel object
                          [20, 20, 40, 30],  # IoU 0.5 with the base one: a keepable box
                          [20, 20, 30, 30],  # IoU 0.25 with the base one: a part
                          [0, 0, 10, 2],  # IoU 0.2 with the novel one
                          [50, 50, 60, 60]])  # fmt: skip
    groups = distill_targets.group_of(boxes, gt, novel)
    assert groups == ["novel", "base", "part of base", "part of novel", "background"]
    no_objects = distill_targets.group_of(boxes[:2], torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool))
    assert no_objects == ["background"] * 2


def test_composition_counts_non_gt_boxes_and_what_their_targets_name():
    text = torch.eye(3)  # names: base0, base1, novel0
    names_novel = torch.tensor([False, False, True])
    cache = {  # per image, as FeatureCache.get gives it
        1: {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [50, 50, 60, 60]]),
            # the GT box's own embedding must not count
            "embeddings": torch.tensor([[0.0, 0, 1], [0, 0, 2], [1, 0, 0], [0, 0, 1]]),
            "is_gt": torch.tensor([True, False, False, False])},
        2: {"boxes": torch.tensor([[50.0, 50, 60, 60]]), "embeddings": torch.tensor([[0.0, 1, 0]]),
            "is_gt": torch.tensor([False])},
    }  # fmt: skip
    objects = {1: (torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]), torch.tensor([True, False]))}
    out = distill_targets.composition(cache, objects, names_novel, text)
    assert out["boxes"] == 4 and out["images"] == 2
    assert out["novel"] == {"share": 0.25, "named_novel": 1.0}
    assert out["part of base"] == {"share": 0.25, "named_novel": 0.0}
    # two background boxes, one named novel, one base (image 2 has no objects: background)
    assert out["background"] == {"share": 0.5, "named_novel": 0.5}
    assert out["base"] == {"share": 0.0, "named_novel": None}
    gt_only = {1: {**cache[1], "is_gt": torch.ones(4, dtype=torch.bool)}}
    with pytest.raises(OvdError, match="GT boxes only"):
        distill_targets.composition(gt_only, objects, names_novel, text)
