"""Mask AP (``ovd eval --iou-type segm``) against pycocotools' and lvis' segm evaluation called directly
on the same files; segmentations in all three COCO forms, crowd regions, and bad segmentations."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from _fixtures import (
    CAT_ID,
    SPLIT,
    coco_direct,
    coco_gt,
    dump,
    lvis_dets,
    lvis_direct,
    lvis_gt,
    run_err,
    same,
    scenario,
)

from ovd.cli import main
from ovd.data.masks import decode, encode, rle_string_counts, segmentation_problem
from ovd.errors import OvdError
from ovd.evaluation import evaluate_detections, format_metrics

SPLIT_KEYS = ["AP", "AP50", "AP_base", "AP50_base", "AP_novel", "AP50_novel"]
SCENARIOS = ["perfect", "partial", "confused", "false_pos", "mixed"]


# --- segmentations built here with numpy, independently of ovd ---------------------------------------
def ellipse_polygon(bbox, n: int = 14) -> list[float]:
    """A polygon of ``n`` points on the ellipse inscribed in ``bbox`` (x, y, w, h)."""
    x, y, w, h = bbox
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        pts += [round(x + w / 2 * (1 + math.cos(t)), 2), round(y + h / 2 * (1 + math.sin(t)), 2)]
    return pts


def ellipse_mask(bbox, height: int, width: int) -> np.ndarray:
    x, y, w, h = bbox
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    return ((((xx - x - w / 2) / (w / 2)) ** 2 + ((yy - y - h / 2) / (h / 2)) ** 2) <= 1).astype(np.uint8)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def segment(bbox, form: str, height: int, width: int):
    """The ellipse in ``bbox`` as polygons, an uncompressed RLE or a compressed RLE."""
    if form == "polygon":
        return [ellipse_polygon(bbox)]
    mask = ellipse_mask(bbox, height, width)
    return uncompressed_rle(mask) if form == "rle" else compressed_rle(mask)


FORMS = ("polygon", "rle", "compressed")


def with_segmentations(gt: dict, crowd: int = 0, seed: int = 0) -> dict:
    """``gt`` with an ellipse segmentation per annotation (the three forms in turn) and ``crowd``
    crowd regions (iscrowd 1, uncompressed RLE, as in COCO) added."""
    gt = copy.deepcopy(gt)
    size = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    for k, a in enumerate(gt["annotations"]):
        a["segmentation"] = segment(a["bbox"], FORMS[k % 3], *size[a["image_id"]])
    rng = random.Random(seed)
    for k in range(crowd):
        im = gt["images"][k % len(gt["images"])]
        h, w = im["height"], im["width"]
        box = [rng.uniform(0, w / 2), rng.uniform(0, h / 2), w / 3, h / 3]
        mask = ellipse_mask(box, h, w)
        gt["annotations"].append({"id": 10_000 + k, "image_id": im["id"], "category_id": CAT_ID["alpha"],
                                  "bbox": box, "area": float(mask.sum()), "iscrowd": 1,
                                  "segmentation": uncompressed_rle(mask)})  # fmt: skip
    return gt


def mask_dets(gt: dict, dets: list[dict], seed: int = 0, polygons: bool = False, with_box: bool = True) -> list[dict]:
    """``dets`` with the ellipse of each box as its segmentation (compressed RLE; every third a
    polygon with ``polygons``), plus detections on the crowd regions."""
    size = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for k, d in enumerate(dets):
        d = dict(d)
        form = "polygon" if polygons and k % 3 == 0 else "compressed"
        d["segmentation"] = segment(d["bbox"], form, *size[d["image_id"]])
        out.append(d)
    rng = random.Random(seed)
    for a in gt["annotations"]:
        if a.get("iscrowd"):  # two detections inside each crowd region: ignored, not false positives
            for _ in range(2):
                x, y, w, h = a["bbox"]
                box = [x + rng.uniform(0, w / 2), y + rng.uniform(0, h / 2), w / 4, h / 4]
                out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": box,
                            "score": round(rng.uniform(0.3, 0.9), 3),
                            "segmentation": segment(box, "compressed", *size[a["image_id"]])})  # fmt: skip
    if not with_box:
        for d in out:
            del d["bbox"]
    return out




@pytest.fixture()
def split_path(tmp_path):
    p = tmp_path / "split.yaml"
    p.write_text(f"base: {json.dumps(SPLIT['base'])}\nnovel: {json.dumps(SPLIT['novel'])}\n")
    return p


# --- COCO --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SCENARIOS)
def test_coco_segm_equals_pycocotools(tmp_path, split_path, kind):
    # polygons, uncompressed and compressed RLE in the GT, three crowd regions with detections on
    # them; polygon and RLE detections
    gt = with_segmentations(coco_gt(), crowd=3)
    gt_path = dump(tmp_path / "gt.json", gt)
    dets = mask_dets(gt, scenario(gt, kind), polygons=kind == "mixed")
    dets_path = dump(tmp_path / "dets.json", dets)
    m = evaluate_detections(gt_path, dets_path, split=str(split_path), iou_type="segm")
    assert list(m) == ["mask_" + k for k in SPLIT_KEYS]
    base = [CAT_ID[n] for n in SPLIT["base"]]
    novel = [CAT_ID[n] for n in SPLIT["novel"]]
    for suffix, ids in (("", base + novel), ("_base", base), ("_novel", novel)):
        ap, ap50 = coco_direct(gt_path, dets_path, ids, iou_type="segm")
        assert same(m[f"mask_AP{suffix}"], ap) and same(m[f"mask_AP50{suffix}"], ap50), (suffix, m, ap, ap50)
    if kind == "perfect":
        assert m["mask_AP50"] == pytest.approx(1.0)
    # the crowd regions matter: without them, the detections on them are false positives
    if kind == "perfect":
        no_crowd = {**gt, "annotations": [a for a in gt["annotations"] if not a["iscrowd"]]}
        m2 = evaluate_detections(dump(tmp_path / "gt2.json", no_crowd), dets_path, split=str(split_path),
                                 iou_type="segm")  # fmt: skip
        assert m2["mask_AP_base"] < m["mask_AP_base"]


def test_mask_ap_differs_from_box_ap_and_both_come_together(tmp_path, split_path):
    gt = with_segmentations(coco_gt())
    gt_path = dump(tmp_path / "gt.json", gt)
    dets = mask_dets(gt, scenario(gt, "perfect"))
    for d in dets[::2]:  # the box itself as the mask: IoU pi/4 with the ellipse
        x, y, w, h = d["bbox"]
        d["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    dets_path = dump(tmp_path / "dets.json", dets)
    box = evaluate_detections(gt_path, dets_path, split=str(split_path))
    mask = evaluate_detections(gt_path, dets_path, split=str(split_path), iou_type="segm")
    both = evaluate_detections(gt_path, dets_path, split=str(split_path), iou_type="bbox,segm")
    assert both == {**box, **mask} and list(box) == SPLIT_KEYS
    # every box is exact, half the masks are not: below 1 only for masks, and only at IoU > pi/4
    assert box["AP"] == pytest.approx(1.0) and mask["mask_AP50"] == pytest.approx(1.0)
    assert mask["mask_AP"] < 0.9
    table = format_metrics(both)
    assert "mask AP" in table.splitlines()[0] and len(table.splitlines()) == 4


def test_segm_detections_without_boxes(tmp_path):
    # pycocotools' results format for masks alone: no bbox, it takes the mask's
    gt = with_segmentations(coco_gt(num_images=3))
    gt_path = dump(tmp_path / "gt.json", gt)
    dets = mask_dets(gt, scenario(gt, "mixed"), with_box=False)
    dets_path = dump(tmp_path / "dets.json", dets)
    m = evaluate_detections(gt_path, dets_path, iou_type="segm")
    ap, ap50 = coco_direct(gt_path, dets_path, [c["id"] for c in gt["categories"]], iou_type="segm")
    assert same(m["mask_AP"], ap) and same(m["mask_AP50"], ap50)
    with pytest.raises(OvdError, match="bbox"):  # a box is needed for box AP
        evaluate_detections(gt_path, dets_path, iou_type="bbox,segm")


# --- LVIS --------------------------------------------------------------------------------------------
def test_lvis_segm_equals_lvis_api(tmp_path):
    gt = with_segmentations(lvis_gt())
    for a in gt["annotations"]:
        a.pop("iscrowd", None)
    gt_path = dump(tmp_path / "lvis.json", gt)
    dets = mask_dets(gt, lvis_dets(gt))
    dets_path = dump(tmp_path / "dets.json", dets)
    m = evaluate_detections(gt_path, dets_path, iou_type="segm")
    official = lvis_direct(gt_path, dets)
    assert {k[len("mask_") :] for k in m} == set(official)
    for k, v in official.items():
        assert same(m["mask_" + k], v), (k, m, official)
    assert {m["mask_APr"], m["mask_APc"], m["mask_APf"]} - {None}  # r/c/f all defined here
    # base / novel groups too (the lvis API restricted to each group's categories)
    split = tmp_path / "split.yaml"
    split.write_text("base: [abacus, accordion, airbag, alarm]\nnovel: [aardvark, acorn]\n")
    m = evaluate_detections(gt_path, dets_path, split=str(split), iou_type="bbox,segm")
    assert same(m["mask_AP_novel"], lvis_direct(gt_path, dets, [1, 5])["AP"])
    assert "APr" in m and "mask_APr" in m


# --- bad segmentations: one error ------------------------------------------------------------------
def _bad_gt_cases():
    return {
        "rle_size": ({"size": [10, 10], "counts": [100]}, "not the image's"),
        "two_points": ([[1.0, 2.0, 30.0, 40.0]], "at least 3"),
        "nan": ([[1.0, 2.0, float("nan"), 40.0, 50.0, 60.0]], "finite"),
        "odd": ([[1.0, 2.0, 30.0, 40.0, 50.0]], "odd"),
        "counts_sum": ({"size": [240, 320], "counts": [5, 10]}, "cover 15 pixels"),
        "bad_string": ({"size": [240, 320], "counts": "\x7f"}, "not a valid"),
        "missing": (None, "no 'segmentation'"),
    }


@pytest.mark.parametrize("case", list(_bad_gt_cases()))
def test_bad_gt_segmentation_is_one_error(tmp_path, capsys, case):
    seg, words = _bad_gt_cases()[case]
    gt = with_segmentations(coco_gt(num_images=2))
    if seg is None:
        del gt["annotations"][1]["segmentation"]
    else:
        gt["annotations"][1]["segmentation"] = seg
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))  # NaN is written as JSON's NaN token, which Python reads back
    dets_path = dump(tmp_path / "dets.json", mask_dets(gt, scenario(gt, "perfect")))
    with pytest.raises(OvdError, match=words) as e:
        evaluate_detections(gt_path, dets_path, iou_type="segm")
    assert "annotations[1]" in str(e.value)
    # box AP does not read the segmentations: the same file evaluates
    assert evaluate_detections(gt_path, dets_path)["AP"] is not None
    line = run_err(capsys, "eval", "--gt", str(gt_path), "--dets", str(dets_path), "--iou-type", "segm")
    assert words in line


@pytest.mark.parametrize("case", ["rle_size", "two_points", "nan", "missing"])
def test_bad_detection_segmentation_is_one_error(tmp_path, case):
    seg, words = _bad_gt_cases()[case]
    gt = with_segmentations(coco_gt(num_images=2))
    gt_path = dump(tmp_path / "gt.json", gt)
    dets = mask_dets(gt, scenario(gt, "perfect"))
    if seg is None:
        del dets[2]["segmentation"]
    else:
        dets[2]["segmentation"] = seg
    dets_path = tmp_path / "dets.json"
    dets_path.write_text(json.dumps(dets))
    with pytest.raises(OvdError, match=words) as e:
        evaluate_detections(gt_path, dets_path, iou_type="segm")
    assert "[2]" in str(e.value) and str(dets_path) in str(e.value)


def test_cli_iou_type(tmp_path, capsys, split_path):
    gt = with_segmentations(coco_gt(num_images=2))
    gt_path = dump(tmp_path / "gt.json", gt)
    dets_path = dump(tmp_path / "dets.json", mask_dets(gt, scenario(gt, "partial")))
    out = tmp_path / "m.json"
    argv = ["eval", "--gt", str(gt_path), "--dets", str(dets_path), "--split", str(split_path), "--out", str(out)]
    assert main(argv + ["--iou-type", "bbox,segm"]) == 0
    m = json.loads(out.read_text())
    assert m == evaluate_detections(gt_path, dets_path, split=str(split_path), iou_type="bbox,segm")
    assert main(argv) == 0  # the default stays box AP alone
    assert list(json.loads(out.read_text())) == SPLIT_KEYS
    assert "expected bbox, segm" in run_err(capsys, *argv, "--iou-type", "mask")


# --- the mask helpers ------------------------------------------------------------------------------
def test_compressed_rle_counts_and_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        rle = compressed_rle(mask)
        assert rle_string_counts(rle["counts"]) == uncompressed_rle(mask)["counts"]
        assert segmentation_problem(rle, h, w) is None
        for form in (rle, uncompressed_rle(mask)):
            assert np.array_equal(decode(form, h, w), mask)
        assert encode(mask[None].astype(bool)) == [rle]
    poly = [ellipse_polygon([3, 4, 20, 10])]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 30, 40)))
    assert np.array_equal(decode(poly, 30, 40), expected) and expected.sum() > 100
