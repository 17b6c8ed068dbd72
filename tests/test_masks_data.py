"""Instance masks in the data path: the mini-world's silhouettes, masks in the training targets
(decoded only when asked for, flipped with the image), COCO / LVIS segmentations, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from ovd.data.coco import load_detection_dataset
from ovd.data.masks import decode
from ovd.data.train_set import DetectionTrainSet
from ovd.errors import OvdError
from ovd.mini_world import PRESETS, PRESETS_V2, generate_mini_world, mini_vocabulary, scene, tasks
from ovd.mini_world.annotations import ANNOTATION_VERSION


@pytest.mark.parametrize("version", [3, 2])
def test_silhouettes_are_the_visible_pixels(version):
    # masks of one scene: their boxes are the annotated boxes, they never overlap (each pixel shows
    # one object at most), and they are silhouettes, not rectangles
    p = PRESETS_V2["smoke"] if version == 2 else PRESETS["smoke"]
    n_cls = len(mini_vocabulary(version))
    fills = []
    for index in range(6):
        rng = tasks._image_rng(0, tasks._DOMAIN_DET, "val", index)
        layout = tasks.det_layout(0, "val", 6, p, n_cls)[index]
        img, objects, _ = scene.render_det(rng, layout, p, version=version)
        masks = np.stack([mask_utils.decode({**seg, "counts": seg["counts"].encode()}) for _, _, seg in objects])
        assert masks.shape[1:] == img.shape[:2]
        assert masks.sum(0).max() == 1  # disjoint
        for (_, box, _), m in zip(objects, masks):
            ys, xs = np.nonzero(m)
            x0, y0 = float(xs.min()), float(ys.min())
            assert [x0, y0, float(xs.max() + 1) - x0, float(ys.max() + 1) - y0] == box
            fills.append(m.sum() / (box[2] * box[3]))
    assert np.mean(fills) < 0.8 and min(fills) < 0.6  # silhouettes, not rectangles (v2 squares fill ~1)


def test_images_unchanged_and_annotation_version(mini_world, tmp_path):
    # the session's world (v2) was built by this generator: same pixels as a world built without
    # any mask code would be is checked by the generator's byte-identity for the images; here the
    # files record the annotation version, and a world built before it is refused by name
    world = json.loads((mini_world / "world.json").read_text())
    assert world["annotation_version"] == ANNOTATION_VERSION == 2
    for rel in ("det/train.json", "det/val.json", "det/val_lvis.json", "det/fewshot/1shot_seed0.json"):
        assert json.loads((mini_world / rel).read_text())["info"]["annotation_version"] == 2, rel
    old = tmp_path / "old"
    shutil.copytree(mini_world, old)
    world.pop("annotation_version")
    (old / "world.json").write_text(json.dumps(world))
    with pytest.raises(OvdError, match="annotation version 1.*overwrite"):
        generate_mini_world(old, preset="smoke", seed=0, progress=False, version=2)
    # an old file used for masks is refused; for boxes it is read as before
    data = json.loads((old / "det/train.json").read_text())
    data["info"].pop("annotation_version")
    (old / "det/train.json").write_text(json.dumps(data))
    ds = load_detection_dataset(old / "det/train.json", old / "det/images")
    DetectionTrainSet(ds, [1, 2, 3])
    with pytest.raises(OvdError, match="before silhouette segmentations"):
        DetectionTrainSet(ds, [1, 2, 3], masks=True)


def _base_ids(world: Path) -> list[int]:
    split = json.loads((world / "split.json").read_text())
    by_name = {c["name"]: c["id"] for c in json.loads((world / "world.json").read_text())["classes"]}
    return [by_name[n] for n in split["base"]]


def test_train_targets_carry_masks_only_when_asked(mini_world, monkeypatch):
    ds = load_detection_dataset(mini_world / "det/train.json", mini_world / "det/images")
    ids = _base_ids(mini_world)
    calls = {"n": 0}
    real = decode

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr("ovd.data.train_set.decode", counting)
    _, t = DetectionTrainSet(ds, ids).get(0)
    assert "masks" not in t and calls["n"] == 0  # box-only: nothing decoded
    img, t = DetectionTrainSet(ds, ids, masks=True).get(0)
    n = len(t["boxes"])
    assert n > 0 and calls["n"] == n
    assert t["masks"].dtype == torch.uint8 and tuple(t["masks"].shape) == (n, *img.shape[-2:])
    for box, m in zip(t["boxes"], t["masks"]):  # same order as the boxes: each mask's box is its box
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] == box.round().int().tolist()


def test_masks_flip_with_the_image(mini_world):
    ds = load_detection_dataset(mini_world / "det/train.json", mini_world / "det/images")
    data = DetectionTrainSet(ds, _base_ids(mini_world), masks=True)
    img, t = data.get(3)
    fimg, ft = data.get(3, flip=True)
    assert torch.equal(fimg, img.flip(-1)) and torch.equal(ft["masks"], t["masks"].flip(-1))
    w = img.shape[-1]
    for box, m in zip(ft["boxes"], ft["masks"]):  # the flipped box still bounds the flipped mask
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert [int(xs.min()), int(xs.max()) + 1] == box[[0, 2]].round().int().tolist()
        assert 0 <= box[0] < box[2] <= w


def _coco_file(tmp_path: Path, segs: list, crowd_seg=None) -> Path:
    """A one-image COCO file (real PNG) with one annotation per segmentation in ``segs``."""
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 20, 10], "area": 200.0, "iscrowd": 0,
             "segmentation": s} for k, s in enumerate(segs)]  # fmt: skip
    if crowd_seg is not None:
        anns.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0,
                     "iscrowd": 1, "segmentation": crowd_seg})  # fmt: skip
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(data))
    return tmp_path / "gt.json"


def test_coco_polygons_and_both_rle_forms_read_through_pycocotools(tmp_path):
    mask = np.zeros((30, 40), np.uint8)
    mask[5:12, 4:20] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    flat = mask.flatten(order="F").astype(int)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, flat, -1]) != 0))  # run lengths, first run of zeros
    uncompressed = {"size": [30, 40], "counts": [int(r) for r in runs]}
    poly = [[2.0, 3.0, 22.0, 3.0, 22.0, 13.0, 2.0, 13.0]]
    crowd = {"size": [30, 40], "counts": [0, 30 * 40]}  # a crowd region: not a training target
    path = _coco_file(tmp_path, [poly, {"size": [30, 40], "counts": rle["counts"].decode()}, uncompressed], crowd)
    ds = load_detection_dataset(path, tmp_path)
    _, t = DetectionTrainSet(ds, [1], masks=True).get(0)
    assert len(t["masks"]) == 3  # the crowd region is left out, as its box is
    expected_poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 30, 40)))
    assert np.array_equal(t["masks"][0].numpy(), expected_poly)
    assert np.array_equal(t["masks"][1].numpy(), mask) and np.array_equal(t["masks"][2].numpy(), mask)


def test_lvis_segmentations(tmp_path):
    mask = np.zeros((30, 40), np.uint8)
    mask[1:9, 30:38] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    path = _coco_file(
        tmp_path, [[[1.0, 1.0, 10.0, 1.0, 5.0, 9.0]], {"size": [30, 40], "counts": rle["counts"].decode()}]
    )
    data = json.loads(path.read_text())
    for im in data["images"]:
        im.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    data["categories"][0]["frequency"] = "r"
    for a in data["annotations"]:
        a.pop("iscrowd")
    path.write_text(json.dumps(data))
    ds = load_detection_dataset(path, tmp_path)
    assert ds.is_lvis
    _, t = DetectionTrainSet(ds, [1], masks=True).get(0)
    for k, a in enumerate(ds.data["annotations"]):
        assert np.array_equal(t["masks"][k].numpy(), ds.api.ann_to_mask(a))


@pytest.mark.parametrize(
    "seg, words",
    [
        ({"size": [30, 41], "counts": [1200]}, "not the image's"),
        ([[1.0, 2.0, 3.0, 4.0]], "at least 3"),
        ([[1.0, 2.0, 3.0, 4.0, float("nan"), 1.0]], "finite"),
        (None, "no 'segmentation'"),
    ],
)
def test_bad_training_segmentation_is_one_error_before_training(tmp_path, seg, words):
    good = [[2.0, 3.0, 22.0, 3.0, 22.0, 13.0]]
    path = _coco_file(tmp_path, [good, seg])
    if seg is None:
        data = json.loads(path.read_text())
        del data["annotations"][1]["segmentation"]
        path.write_text(json.dumps(data))
    ds = load_detection_dataset(path, tmp_path)
    DetectionTrainSet(ds, [1])  # boxes only: segmentations are not read
    with pytest.raises(OvdError, match=words) as e:
        DetectionTrainSet(ds, [1], masks=True)
    assert "annotations[1]" in str(e.value) and str(path) in str(e.value)
