"""``ovd eval`` / ``evaluate_detections`` against pycocotools and lvis called directly on the same files."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
from _fixtures import (
    CAT_ID,
    LVIS_CATS,
    OFFICIAL_BASE_48,
    OFFICIAL_NOVEL_17,
    SPLIT,
    coco_direct,
    coco_gt,
    dump,
    load_make_eval_example,
    lvis_dets,
    lvis_direct,
    lvis_gt,
    same,
    scenario,
)

from ovd.cli import main
from ovd.errors import OvdError
from ovd.evaluation import evaluate_detections, format_metrics

SPLIT_KEYS = ["AP", "AP50", "AP_base", "AP50_base", "AP_novel", "AP50_novel"]
BASE_IDS = [CAT_ID[n] for n in SPLIT["base"]]
NOVEL_IDS = [CAT_ID[n] for n in SPLIT["novel"]]
SCENARIOS = ["perfect", "partial", "confused", "false_pos", "mixed"]




def assert_coco_equal(metrics: dict, gt_path, dets_path, groups: dict[str, list[int]]) -> None:
    for suffix, ids in groups.items():
        ap, ap50 = coco_direct(gt_path, dets_path, ids)
        assert same(metrics[f"AP{suffix}"], ap), (suffix, metrics, ap)
        assert same(metrics[f"AP50{suffix}"], ap50), (suffix, metrics, ap50)


@pytest.fixture()
def coco_files(tmp_path):
    gt = coco_gt()
    gt_path = dump(tmp_path / "gt.json", gt)
    split_path = tmp_path / "split.yaml"
    split_path.write_text(f"base: {json.dumps(SPLIT['base'])}\nnovel: {json.dumps(SPLIT['novel'])}\n")
    return gt, gt_path, split_path


# --- COCO ground truth -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SCENARIOS)
def test_coco_no_split_equals_pycocotools(tmp_path, coco_files, kind):
    gt, gt_path, _ = coco_files
    dets = scenario(gt, kind)
    dets_path = dump(tmp_path / "dets.json", dets)
    m = evaluate_detections(gt_path, dets_path)
    assert list(m) == ["AP", "AP50"]
    all_ids = [c["id"] for c in gt["categories"]]
    assert_coco_equal(m, gt_path, dets_path, {"": all_ids})
    # the same detections given as a list give the same numbers, and the list is left untouched
    before = copy.deepcopy(dets)
    assert evaluate_detections(gt_path, dets) == m
    assert dets == before


@pytest.mark.parametrize("kind", SCENARIOS)
def test_coco_custom_split_equals_pycocotools(tmp_path, coco_files, kind):
    gt, gt_path, split_path = coco_files
    dets_path = dump(tmp_path / "dets.json", scenario(gt, kind))
    m = evaluate_detections(gt_path, dets_path, split=str(split_path))
    assert list(m) == SPLIT_KEYS
    groups = {"": sorted(BASE_IDS + NOVEL_IDS), "_base": BASE_IDS, "_novel": NOVEL_IDS}
    assert_coco_equal(m, gt_path, dets_path, groups)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())


def test_perfect_detections_are_ap_one(tmp_path, coco_files):
    gt, gt_path, split_path = coco_files
    dets_path = dump(tmp_path / "dets.json", scenario(gt, "perfect"))
    m = evaluate_detections(gt_path, dets_path, split=str(split_path))
    assert all(v == pytest.approx(1.0) for v in m.values()), m
    assert coco_direct(gt_path, dets_path, BASE_IDS + NOVEL_IDS) == (pytest.approx(1.0), pytest.approx(1.0))


def test_imperfect_detections_are_below_one(tmp_path, coco_files):
    gt, gt_path, split_path = coco_files
    m = evaluate_detections(gt_path, scenario(gt, "partial"), split=str(split_path))
    assert all(0.0 < v < 0.95 for v in m.values()), m


def test_empty_detections_give_zero_where_there_is_ground_truth(tmp_path, coco_files):
    gt, gt_path, split_path = coco_files
    dets_path = dump(tmp_path / "dets.json", [])
    assert evaluate_detections(gt_path, dets_path) == {"AP": 0.0, "AP50": 0.0}
    m = evaluate_detections(gt_path, [], split=str(split_path))
    assert m == dict.fromkeys(SPLIT_KEYS, 0.0)
    # a group whose categories have no ground truth at all has no AP: None, not 0 or -1
    no_gt_split = dump(tmp_path / "s.json", {"base": ["alpha"], "novel": ["empty"]})
    m = evaluate_detections(gt_path, [], split=str(no_gt_split))
    assert m["AP_base"] == 0.0 and m["AP50_base"] == 0.0
    assert m["AP_novel"] is None and m["AP50_novel"] is None


def test_group_without_ground_truth_is_none_even_with_detections(tmp_path, coco_files):
    gt, gt_path, _ = coco_files
    dets = scenario(gt, "partial")
    dets += [{"image_id": 100, "category_id": CAT_ID["empty"], "bbox": [1.0, 2.0, 30.0, 30.0], "score": 0.9}]
    dets_path = dump(tmp_path / "dets.json", dets)
    split_path = dump(tmp_path / "s.json", {"base": ["alpha", "beta"], "novel": ["empty"]})
    m = evaluate_detections(gt_path, dets_path, split=str(split_path))
    assert coco_direct(gt_path, dets_path, [CAT_ID["empty"]]) == (-1.0, -1.0)
    assert m["AP_novel"] is None and m["AP50_novel"] is None
    # "all" is base ∪ novel; the empty novel group adds nothing to it
    assert_coco_equal(m, gt_path, dets_path, {"": sorted(BASE_IDS + [CAT_ID["empty"]]), "_base": BASE_IDS})
    assert m["AP"] == m["AP_base"]


def test_category_in_neither_group_does_not_affect_split_metrics(tmp_path, coco_files):
    _, _, split_path = coco_files
    gt_with = coco_gt(with_omega=True)
    omega = CAT_ID["omega"]
    dets_with = [d for d in scenario(gt_with, "mixed") if d["category_id"] != omega]
    # omega: badly detected (all missed) plus confident false positives, so it would pull AP down
    dets_with += [{"image_id": im["id"], "category_id": omega, "bbox": [0.0, 0.0, 15.0, 15.0], "score": 0.99}
                  for im in gt_with["images"]]  # fmt: skip
    gt_without = {**gt_with, "annotations": [a for a in gt_with["annotations"] if a["category_id"] != omega]}
    dets_without = [d for d in dets_with if d["category_id"] != omega]
    assert len(gt_without["annotations"]) < len(gt_with["annotations"])
    assert len(dets_without) < len(dets_with)

    p_with, p_without = (
        dump(tmp_path / "gt_with.json", gt_with),
        dump(tmp_path / "gt_without.json", gt_without),
    )
    m_with = evaluate_detections(p_with, dets_with, split=str(split_path))
    m_without = evaluate_detections(p_without, dets_without, split=str(split_path))
    assert m_with == m_without
    dets_path = dump(tmp_path / "dets_with.json", dets_with)
    assert_coco_equal(m_with, p_with, dets_path, {"": sorted(BASE_IDS + NOVEL_IDS)})
    # without a split every category counts, so omega does change the overall number
    assert evaluate_detections(p_with, dets_with)["AP"] != evaluate_detections(p_without, dets_without)["AP"]


def test_gt_as_loaded_dataset_and_split_object(tmp_path, coco_files):
    from ovd.data import load_detection_dataset, resolve_split

    gt, gt_path, split_path = coco_files
    dets = scenario(gt, "mixed")
    ds = load_detection_dataset(gt_path, drop_degenerate=False)
    split = resolve_split(str(split_path), ds.categories)
    assert evaluate_detections(ds, dets, split=split) == evaluate_detections(gt_path, dets, split=str(split_path))


def test_coco_ovd_48_17_on_make_example(tmp_path):
    load_make_eval_example().make_example(tmp_path)
    gt_path, dets_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt = json.loads(gt_path.read_text())
    names = {c["name"]: c["id"] for c in gt["categories"]}
    assert len(names) == 80
    base = sorted(names[n] for n in OFFICIAL_BASE_48)
    novel = sorted(names[n] for n in OFFICIAL_NOVEL_17)
    assert base == sorted(OFFICIAL_BASE_48.values()) and novel == sorted(OFFICIAL_NOVEL_17.values())

    m = evaluate_detections(gt_path, dets_path, split="coco_ovd_48_17")
    assert list(m) == SPLIT_KEYS
    assert_coco_equal(m, gt_path, dets_path, {"": sorted(base + novel), "_base": base, "_novel": novel})
    assert all(v is not None and 0.0 < v < 1.0 for v in m.values()), m
    assert m["AP_base"] > m["AP_novel"]  # what the example is built to show
    # without a split, all 80 categories count
    m80 = evaluate_detections(gt_path, dets_path)
    assert_coco_equal(m80, gt_path, dets_path, {"": sorted(names.values())})
    assert m80["AP"] != m["AP"]


# --- LVIS ground truth -----------------------------------------------------------------------------
@pytest.fixture()
def lvis_files(tmp_path):
    gt = lvis_gt()
    dets = lvis_dets(gt)
    return gt, dump(tmp_path / "lvis_gt.json", gt), dets, dump(tmp_path / "lvis_dets.json", dets)


def assert_lvis_equal(ours: dict, official: dict) -> None:
    assert {"AP", "AP50", "APr", "APc", "APf"} <= set(official)
    for k, v in official.items():
        assert same(ours[k], v), (k, ours[k], v)


def test_lvis_autodetected_equals_lvis_api(lvis_files):
    _, gt_path, dets, dets_path = lvis_files
    official = lvis_direct(gt_path, dets)
    m = evaluate_detections(gt_path, dets_path)
    assert set(m) == set(official)
    assert_lvis_equal(m, official)
    assert m["AP"] is not None and 0.0 < m["AP"] < 1.0
    # forcing the LVIS API gives the same numbers
    assert evaluate_detections(gt_path, dets_path, lvis=True) == m
    assert evaluate_detections(gt_path, dets) == m


def test_lvis_perfect_detections(lvis_files):
    gt, gt_path, _, _ = lvis_files
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    official = lvis_direct(gt_path, dets)
    assert official["AP"] == pytest.approx(1.0)
    m = evaluate_detections(gt_path, dets)
    assert_lvis_equal(m, official)
    assert m["APr"] == pytest.approx(1.0) and m["APc"] == pytest.approx(1.0) and m["APf"] == pytest.approx(1.0)


def test_lvis_rare_split_equals_lvis_api(lvis_files):
    _, gt_path, dets, dets_path = lvis_files
    rare = [i for i, _, f in LVIS_CATS if f == "r"]
    common_freq = [i for i, _, f in LVIS_CATS if f in "cf"]
    m = evaluate_detections(gt_path, dets_path, split="lvis_rare")
    assert {"AP_base", "AP50_base", "AP_novel", "AP50_novel"} <= set(m)
    assert_lvis_equal(m, lvis_direct(gt_path, dets))
    novel = lvis_direct(gt_path, dets, rare)
    base = lvis_direct(gt_path, dets, common_freq)
    assert same(m["AP_novel"], novel["AP"]) and same(m["AP50_novel"], novel["AP50"])
    assert same(m["AP_base"], base["AP"]) and same(m["AP50_base"], base["AP50"])
    assert m["AP_novel"] != m["AP_base"]


def test_lvis_empty_detections(lvis_files):
    _, gt_path, _, _ = lvis_files
    m = evaluate_detections(gt_path, [], split="lvis_rare")
    for k in ("AP", "AP50", "APr", "APc", "APf", "AP_base", "AP_novel"):
        assert m[k] == 0.0, (k, m)


def test_lvis_forced_on_coco_file_is_a_clear_error(coco_files):
    _, gt_path, _ = coco_files
    with pytest.raises(OvdError, match=r"gt\.json.*frequency"):
        evaluate_detections(gt_path, [], lvis=True)


def test_lvis_file_evaluated_with_coco_api_when_asked(tmp_path, lvis_files):
    gt, _, _, dets_path = lvis_files
    for a in gt["annotations"]:
        a["iscrowd"] = 0  # pycocotools needs it (see test_gt_without_area_or_iscrowd_...)
    gt_path = dump(tmp_path / "lvis_crowd.json", gt)
    assert evaluate_detections(gt_path, dets_path)["APr"] is not None  # still detected as LVIS
    m = evaluate_detections(gt_path, dets_path, lvis=False)
    assert list(m) == ["AP", "AP50"]
    assert_coco_equal(m, gt_path, dets_path, {"": [c["id"] for c in gt["categories"]]})


# --- the CLI ---------------------------------------------------------------------------------------
def test_cli_eval_writes_api_result_atomically(tmp_path, coco_files, capsys):
    gt, gt_path, split_path = coco_files
    dets_path = dump(tmp_path / "dets.json", scenario(gt, "mixed"))
    out_dir = tmp_path / "out"
    out = out_dir / "metrics.json"
    rc = main(
        [
            "eval",
            "--gt",
            str(gt_path),
            "--dets",
            str(dets_path),
            "--split",
            str(split_path),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    expected = evaluate_detections(gt_path, dets_path, split=str(split_path))
    assert json.loads(out.read_text()) == expected
    assert os.listdir(out_dir) == ["metrics.json"]
    printed = capsys.readouterr().out
    assert format_metrics(expected) in printed
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    for group, suffix in (("all", ""), ("base", "_base"), ("novel", "_novel")):
        assert [float(v) for v in rows[group]] == [
            pytest.approx(expected[f"AP{suffix}"], abs=5e-5),
            pytest.approx(expected[f"AP50{suffix}"], abs=5e-5),
        ]


def test_cli_eval_lvis_flag(tmp_path, lvis_files, capsys):
    _, gt_path, dets, dets_path = lvis_files
    out = tmp_path / "m.json"
    assert main(["eval", "--gt", str(gt_path), "--dets", str(dets_path), "--lvis", "--out", str(out)]) == 0
    assert_lvis_equal(json.loads(out.read_text()), lvis_direct(gt_path, dets))
    assert "APr" in capsys.readouterr().out


def test_cli_eval_lvis_flag_on_coco_file(tmp_path, coco_files, capsys):
    _, gt_path, _ = coco_files
    dets_path = dump(tmp_path / "d.json", [])
    assert main(["eval", "--gt", str(gt_path), "--dets", str(dets_path)]) == 0
    capsys.readouterr()
    assert main(["eval", "--gt", str(gt_path), "--dets", str(dets_path), "--lvis"]) == 2
    assert "frequency" in capsys.readouterr().err


def test_cli_eval_null_for_group_without_gt(tmp_path, coco_files):
    _, gt_path, _ = coco_files
    split_path = dump(tmp_path / "s.json", {"base": ["alpha"], "novel": ["empty"]})
    out = tmp_path / "m.json"
    assert main(["eval", "--gt", str(gt_path), "--dets", str(dump(tmp_path / "d.json", [])),
                 "--split", str(split_path), "--out", str(out)]) == 0  # fmt: skip
    text = out.read_text()
    assert '"AP_novel": null' in text
    assert json.loads(text)["AP_base"] == 0.0


def _bad_dets_cases(gt: dict) -> dict:
    ok = {
        "image_id": gt["images"][0]["id"],
        "category_id": CAT_ID["alpha"],
        "bbox": [1, 2, 3, 4],
        "score": 0.5,
    }
    return {
        "unknown_image": ([ok, {**ok, "image_id": 987654}], "987654"),
        "unknown_category": ([{**ok, "category_id": 4242}, ok], "4242"),
        "bad_bbox": ([{**ok, "bbox": [1, 2, 3]}], "bbox"),
        "nan_score": ([{**ok, "score": float("nan")}], "score"),
        "not_a_list": ({"image_id": 100}, "list"),
        "annotation_file": (gt, "annotation file"),
    }


@pytest.mark.parametrize(
    "case", ["unknown_image", "unknown_category", "bad_bbox", "nan_score", "not_a_list", "annotation_file",
             "malformed", "missing_dets", "missing_gt"]
)  # fmt: skip
def test_cli_eval_errors(tmp_path, coco_files, capsys, case):
    gt, gt_path, split_path = coco_files
    dets_path = tmp_path / "dets.json"
    if case == "malformed":
        dets_path.write_text('[{"image_id": 100,')
        needle = "dets.json"
    elif case == "missing_dets":
        dets_path = tmp_path / "nope_dets.json"
        needle = "nope_dets.json"
    elif case == "missing_gt":
        dump(dets_path, [])
        gt_path = tmp_path / "nope_gt.json"
        needle = "nope_gt.json"
    else:
        data, needle = _bad_dets_cases(gt)[case]
        dump(dets_path, data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = out_dir / "old.json"
    old.write_text("previous")
    for out in (out_dir / "metrics.json", old):
        rc = main(["eval", "--gt", str(gt_path), "--dets", str(dets_path), "--split", str(split_path),
                   "--out", str(out)])  # fmt: skip
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("ovd: error: ")
        assert err.count("\n") == 1, err  # one line, no traceback
        assert needle in err
        assert sorted(os.listdir(out_dir)) == ["old.json"]
        assert old.read_text() == "previous"


def test_detection_errors_name_the_offending_ids(coco_files):
    gt, gt_path, _ = coco_files
    cases = _bad_dets_cases(gt)
    with pytest.raises(OvdError, match=r"image_id 987654 .*gt\.json"):
        evaluate_detections(gt_path, cases["unknown_image"][0])
    with pytest.raises(OvdError, match=r"\[0\]: category_id 4242"):
        evaluate_detections(gt_path, cases["unknown_category"][0])


# --- regressions of bugs found in review --------------------------------------
@pytest.mark.parametrize("key", ["area", "iscrowd"])
def test_gt_without_area_or_iscrowd_is_evaluated_with_box_area_and_not_crowd(tmp_path, coco_files, key):
    """pycocotools needs both fields and LVIS files have no 'iscrowd': ovd fills the obvious values
    (box area, not a crowd), so such a file evaluates exactly like one that writes them out."""
    from ovd.data import load_detection_dataset

    gt, full_path, split_path = coco_files
    stripped = copy.deepcopy(gt)
    for a in stripped["annotations"]:
        del a[key]
    gt_path = dump(tmp_path / "noarea.json", stripped)
    ds = load_detection_dataset(gt_path, drop_degenerate=False)
    filled = [a for i in ds.image_ids for a in ds.annotations_of(i)]
    assert len(filled) == len(gt["annotations"])
    for a in filled:
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) and a["iscrowd"] == 0
    perfect = evaluate_detections(gt_path, scenario(gt, "perfect"), split=str(split_path))
    # every box found: a crowd (ignored) GT box would leave nothing to find, AP undefined
    assert perfect["AP"] == perfect["AP50"] == perfect["AP_novel"] == perfect["AP_base"] == 1.0
    mixed = scenario(gt, "mixed")
    assert evaluate_detections(gt_path, mixed, split=str(split_path)) == evaluate_detections(
        full_path, mixed, split=str(split_path)
    )


def test_out_file_gets_normal_permissions(tmp_path, coco_files):
    _, gt_path, _ = coco_files
    out = tmp_path / "m.json"
    assert main(["eval", "--gt", str(gt_path), "--dets", str(dump(tmp_path / "d.json", [])), "--out", str(out)]) == 0
    ref = tmp_path / "ref.json"
    ref.write_text("{}")  # what a plain open() creates under the current umask
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(ref.stat().st_mode)


def test_out_is_a_directory_is_a_clear_error(tmp_path, coco_files, capsys):
    _, gt_path, _ = coco_files
    out_dir = tmp_path / "outdir"
    out_dir.mkdir()
    rc = main(["eval", "--gt", str(gt_path), "--dets", str(dump(tmp_path / "d.json", [])), "--out", str(out_dir)])
    assert rc == 2 and "outdir" in capsys.readouterr().err
