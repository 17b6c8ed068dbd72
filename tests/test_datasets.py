"""``load_detection_dataset``: COCO / LVIS files, format detection, records, and clear errors."""

from __future__ import annotations

import math
import warnings

import pytest
from _fixtures import CAT_ID, CATS, LVIS_CATS, ann, coco_gt, dump, lvis_gt

from ovd.data import load_detection_dataset
from ovd.errors import OvdError


def small_coco() -> dict:
    return {
        "images": [{"id": 7, "file_name": "a/x.jpg", "width": 100, "height": 80},
                   {"id": 9, "file_name": "y.jpg", "width": 50, "height": 50}],
        "annotations": [ann(1, 7, 3, [10, 20, 30, 40]), ann(2, 7, 11, [0.5, 1.5, 2.0, 3.0]),
                        ann(3, 9, 3, [5, 5, 10, 10], iscrowd=1)],
        "categories": [{"id": 3, "name": "alpha"}, {"id": 11, "name": "gamma"}],
    }  # fmt: skip


def test_coco_file_loads(tmp_path):
    path = dump(tmp_path / "gt.json", small_coco())
    ds = load_detection_dataset(path)
    assert not ds.is_lvis
    assert len(ds) == 2 and ds.image_ids == [7, 9]
    assert ds.cat_ids == [3, 11] and ds.cat_names == ["alpha", "gamma"]
    assert ds.name_of(3) == "alpha" and ds.name_of(11) == "gamma"
    assert ds.num_dropped_degenerate == 0
    assert sorted(ds.api.getAnnIds()) == [1, 2, 3]  # the pycocotools index is built

    r = ds.record(0)
    assert r["image_id"] == 7 and r["width"] == 100 and r["height"] == 80
    assert r["boxes"] == [[10, 20, 40, 60], [0.5, 1.5, 2.5, 4.5]]  # xywh -> xyxy
    assert r["labels"] == [3, 11]  # category ids, not indices
    assert r["path"] == tmp_path / "a" / "x.jpg"  # relative to the annotation file by default
    r = ds.record(1)
    assert r["boxes"] == [] and r["labels"] == []  # crowd boxes are not training targets


def test_image_root(tmp_path):
    ds = load_detection_dataset(dump(tmp_path / "gt.json", small_coco()), image_root=tmp_path / "imgs")
    assert ds.record(1)["path"] == tmp_path / "imgs" / "y.jpg"


def test_lvis_file_loads_and_is_detected(tmp_path):
    gt = lvis_gt()
    ds = load_detection_dataset(dump(tmp_path / "lvis.json", gt))
    assert ds.is_lvis
    assert ds.cat_ids == [c[0] for c in LVIS_CATS]
    assert all(ds.name_of(i) == n for i, n, _ in LVIS_CATS)
    assert type(ds.api).__name__ == "LVIS"
    assert sorted(ds.api.get_ann_ids()) == sorted(a["id"] for a in gt["annotations"])
    a = gt["annotations"][0]
    idx = ds.image_ids.index(a["image_id"])
    x, y, w, h = a["bbox"]
    assert [x, y, x + w, y + h] in ds.record(idx)["boxes"]


@pytest.mark.parametrize("which", ["categories", "images"])
def test_lvis_detected_from_either_marker(tmp_path, which):
    gt = small_coco()
    if which == "categories":
        for c in gt["categories"]:
            c["frequency"] = "f"
        missing = r"images\[0\].*neg_category_ids"
    else:
        for im in gt["images"]:
            im["neg_category_ids"], im["not_exhaustive_category_ids"] = [], []
        missing = r"categories\[0\].*frequency"
    # either marker makes it LVIS; LVIS needs both, so the one left out is then reported
    with pytest.raises(OvdError, match=r"gt\.json.*" + missing):
        load_detection_dataset(dump(tmp_path / "gt.json", gt))
    assert load_detection_dataset(dump(tmp_path / "gt.json", gt), lvis=False).is_lvis is False


def test_forced_formats(tmp_path):
    lv = dump(tmp_path / "lvis.json", lvis_gt())
    assert load_detection_dataset(lv, lvis=True).is_lvis
    assert not load_detection_dataset(lv, lvis=False).is_lvis
    with pytest.raises(OvdError, match=r"coco\.json.*categories\[0\].*frequency"):
        load_detection_dataset(dump(tmp_path / "coco.json", small_coco()), lvis=True)


def test_lvis_bad_frequency_and_missing_image_lists(tmp_path):
    gt = lvis_gt()
    gt["categories"][2]["frequency"] = "x"
    with pytest.raises(OvdError, match=r"lvis\.json: categories\[2\].*frequency"):
        load_detection_dataset(dump(tmp_path / "lvis.json", gt))
    gt = lvis_gt()
    del gt["images"][1]["not_exhaustive_category_ids"]
    with pytest.raises(OvdError, match=r"images\[1\].*not_exhaustive_category_ids"):
        load_detection_dataset(dump(tmp_path / "lvis.json", gt), lvis=True)


# --- errors ----------------------------------------------------------------------------------------
def _mutated(fn) -> dict:
    gt = small_coco()
    fn(gt)
    return gt


ERROR_CASES = {
    "no_images": (lambda g: g.pop("images"), r"missing top-level field 'images'"),
    "no_annotations": (lambda g: g.pop("annotations"), r"'annotations'"),
    "images_not_list": (lambda g: g.update(images={"id": 1}), r"'images' must be a list"),
    "unknown_image_id": (
        lambda g: g["annotations"][1].update(image_id=404),
        r"annotations\[1\].*image_id 404",
    ),
    "unknown_category": (
        lambda g: g["annotations"][0].update(category_id=55),
        r"annotations\[0\].*category_id 55",
    ),
    "bbox_3_numbers": (lambda g: g["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\].*'bbox'"),
    "bbox_nan": (lambda g: g["annotations"][1].update(bbox=[1, 2, math.nan, 4]), r"annotations\[1\].*'bbox'"),
    "bbox_string": (lambda g: g["annotations"][1].update(bbox=["1", 2, 3, 4]), r"annotations\[1\].*'bbox'"),
    "dup_cat_name": (
        lambda g: g["categories"].append({"id": 12, "name": "alpha"}),
        r"categories\[2\].*duplicate category name 'alpha'",
    ),
    "dup_cat_id": (lambda g: g["categories"].append({"id": 3, "name": "zeta"}), r"duplicate category id 3"),
    "cat_without_name": (lambda g: g["categories"].append({"id": 13}), r"categories\[2\].*'name'"),
    "dup_image_id": (
        lambda g: g["images"].append({"id": 7, "file_name": "z.jpg"}),
        r"images\[2\].*duplicate image id 7",
    ),
    "image_bad_width": (lambda g: g["images"][0].update(width=0), r"images\[0\].*'width'"),
    "dup_ann_id": (lambda g: g["annotations"][2].update(id=1), r"annotations\[2\].*duplicate annotation id"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_annotation_file_is_a_clear_error(tmp_path, case):
    fn, pattern = ERROR_CASES[case]
    path = dump(tmp_path / "bad_gt.json", _mutated(fn))
    with pytest.raises(OvdError, match=pattern) as e:
        load_detection_dataset(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "\n" not in msg


def test_all_bad_annotations_are_counted_and_listed(tmp_path):
    gt = small_coco()
    for k in range(8):
        gt["annotations"].append(ann(10 + k, 404 + k, 3, [1, 1, 5, 5]))
    with pytest.raises(OvdError) as e:
        load_detection_dataset(dump(tmp_path / "gt.json", gt))
    msg = str(e.value)
    assert "8 bad annotation(s)" in msg
    assert "image_id 404" in msg and "and 3 more" in msg  # the first five are named


def test_missing_file(tmp_path):
    with pytest.raises(OvdError, match=r"not found.*nothere\.json"):
        load_detection_dataset(tmp_path / "nothere.json")


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1},\n')
    with pytest.raises(OvdError, match=r"broken\.json.*not valid JSON.*line"):
        load_detection_dataset(path)


def test_binary_file(tmp_path):
    path = tmp_path / "img.json"
    path.write_bytes(b"\xff\xd8\xff\xe0JFIF\x00")
    with pytest.raises(OvdError, match=r"img\.json"):
        load_detection_dataset(path)


@pytest.mark.parametrize("top", [[], "text", 3])
def test_top_level_not_an_object(tmp_path, top):
    path = dump(tmp_path / "list.json", top)
    with pytest.raises(OvdError, match=r"list\.json.*JSON object"):
        load_detection_dataset(path)


# --- degenerate boxes ------------------------------------------------------------------------------
def _with_degenerate() -> dict:
    gt = coco_gt(num_images=2)
    n = len(gt["annotations"])
    gt["annotations"] += [ann(n + 1, 100, CAT_ID["alpha"], [5, 5, 0, 10]),
                          ann(n + 2, 101, CAT_ID["beta"], [5, 5, 10, -1]),
                          ann(n + 3, 101, CAT_ID["beta"], [5, 5, 0.0, 0.0])]  # fmt: skip
    return gt


def test_degenerate_boxes_dropped_with_one_counted_warning(tmp_path):
    gt = _with_degenerate()
    path = dump(tmp_path / "gt.json", gt)
    with pytest.warns(UserWarning, match=r"gt\.json.*skipped 3 annotation") as rec:
        ds = load_detection_dataset(path)
    assert len([w for w in rec if "skipped" in str(w.message)]) == 1
    assert ds.num_dropped_degenerate == 3
    kept = {a["id"] for a in ds.data["annotations"]}
    assert kept == {a["id"] for a in gt["annotations"][:-3]}
    assert len(ds.api.getAnnIds()) == len(gt["annotations"]) - 3
    for i in range(len(ds)):
        assert all(b[2] > b[0] and b[3] > b[1] for b in ds.record(i)["boxes"])


def test_degenerate_boxes_kept_when_asked(tmp_path):
    gt = _with_degenerate()
    path = dump(tmp_path / "gt.json", gt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_detection_dataset(path, drop_degenerate=False)
    assert ds.num_dropped_degenerate == 0
    assert len(ds.data["annotations"]) == len(gt["annotations"])
    assert [5, 5, 5, 15] in ds.record(0)["boxes"]


def test_loading_does_not_modify_input_on_disk(tmp_path):
    gt = _with_degenerate()
    path = dump(tmp_path / "gt.json", gt)
    before = path.read_bytes()
    with pytest.warns(UserWarning):
        load_detection_dataset(path)
    assert path.read_bytes() == before


def test_ids_are_not_positions(tmp_path):
    """Category ids are used as given (non-contiguous), for every category."""
    gt = coco_gt(num_images=1)
    ds = load_detection_dataset(dump(tmp_path / "gt.json", gt))
    assert ds.cat_ids == [i for i, _ in CATS]
    assert set(ds.record(0)["labels"]) <= {i for i, _ in CATS}
    assert all(ds.name_of(i) == n for i, n in CATS)


# --- regression of a bug found in review --------------------------------------
@pytest.mark.parametrize("field", ["image_id", "category_id"])
def test_list_valued_id_is_a_clear_error(tmp_path, field):
    gt = small_coco()
    gt["annotations"][0][field] = [7]
    with pytest.raises(OvdError, match=field):
        load_detection_dataset(dump(tmp_path / "gt.json", gt))
