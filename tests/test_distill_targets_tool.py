"""tools/distill_targets.py: where the distilled boxes lie and what their targets name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

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


def test_composition_counts_non_gt_boxes_and_what_their_targets_name(tmp_path):
    text = torch.eye(3)  # names: base0, base1, novel0
    names_novel = torch.tensor([False, False, True])
    cache = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [50, 50, 60, 60], [50, 50, 60, 60]]),
        # the GT box's own embedding must not count; two background boxes: one named novel, one base
        "embeddings": torch.tensor([[0.0, 0, 1], [0, 0, 2], [1, 0, 0], [0, 0, 1], [0, 1, 0]]),
        "image_ids": torch.tensor([1, 1, 1, 1, 2]),
        "is_gt": torch.tensor([1, 0, 0, 0, 0], dtype=torch.uint8),
    }
    objects = {1: (torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]), torch.tensor([True, False]))}
    out = distill_targets.composition(cache, objects, names_novel, text)
    assert out["boxes"] == 4 and out["images"] == 2
    assert out["novel"] == {"share": 0.25, "named_novel": 1.0}
    assert out["part of base"] == {"share": 0.25, "named_novel": 0.0}
    assert out["background"] == {"share": 0.5, "named_novel": 0.5}  # image 2 has no objects: background
    assert out["base"] == {"share": 0.0, "named_novel": None}
    # the cache is read back from its chunks the way the extract stage writes them
    save_file({k: v for k, v in cache.items()}, str(tmp_path / "chunk_00000.safetensors"))
    back = distill_targets.load_cache(tmp_path)
    assert torch.equal(back["boxes"], cache["boxes"])
    with pytest.raises(OvdError, match="no feature cache chunks"):
        distill_targets.load_cache(tmp_path / "missing")
