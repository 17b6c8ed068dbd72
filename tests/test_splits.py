"""``resolve_split``: the COCO 48/17 and LVIS-rare splits, user split files, and clear errors."""

from __future__ import annotations

import json
import random

import pytest
from _fixtures import LVIS_CATS, OFFICIAL_BASE_48, OFFICIAL_NEITHER_15, OFFICIAL_NOVEL_17, dump

from ovd.data.coco_categories import COCO_CATEGORIES
from ovd.data.splits import resolve_split
from ovd.errors import OvdError

OFFICIAL_ALL_80 = {**OFFICIAL_BASE_48, **OFFICIAL_NOVEL_17, **OFFICIAL_NEITHER_15}


def coco80() -> list[dict]:
    return [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATEGORIES]


def test_coco_categories_are_the_official_80():
    assert len(OFFICIAL_ALL_80) == 80
    assert dict((n, i) for i, n in COCO_CATEGORIES) == OFFICIAL_ALL_80
    assert [i for i, _ in COCO_CATEGORIES] == sorted(OFFICIAL_ALL_80.values())


def test_coco_ovd_48_17():
    s = resolve_split("coco_ovd_48_17", coco80())
    assert s.name == "coco_ovd_48_17"
    assert len(s.base_ids) == 48 and len(s.novel_ids) == 17
    assert set(s.base_ids) == set(OFFICIAL_BASE_48.values())
    assert set(s.novel_ids) == set(OFFICIAL_NOVEL_17.values())
    assert set(s.base_names) == set(OFFICIAL_BASE_48) and set(s.novel_names) == set(OFFICIAL_NOVEL_17)
    # names and ids line up
    assert all(
        OFFICIAL_ALL_80[n] == i for n, i in zip(s.base_names + s.novel_names, s.base_ids + s.novel_ids, strict=True)
    )
    # a few by their official ids
    assert 1 in s.base_ids  # person
    assert 72 in s.base_ids and 90 in s.base_ids  # tv, toothbrush
    assert 5 in s.novel_ids and 63 in s.novel_ids and 87 in s.novel_ids  # airplane, couch, scissors
    for i in (10, 11, 37, 67, 89):  # traffic light, fire hydrant, sports ball, dining table, hair drier
        assert i not in s.base_ids and i not in s.novel_ids
    leftover = {c["name"] for c in coco80()} - set(s.base_names) - set(s.novel_names)
    assert leftover == set(OFFICIAL_NEITHER_15)
    assert s.all_ids == tuple(sorted(set(OFFICIAL_BASE_48.values()) | set(OFFICIAL_NOVEL_17.values())))
    assert s.all_names == s.base_names + s.novel_names


def test_split_follows_dataset_category_order_and_ids():
    cats = coco80()
    random.Random(0).shuffle(cats)
    for k, c in enumerate(cats):
        c["id"] = 1000 + k  # ids of some remapped dataset: matching is by name
    s = resolve_split("coco_ovd_48_17", cats)
    order = [c["name"] for c in cats]
    assert list(s.base_names) == [n for n in order if n in OFFICIAL_BASE_48]
    assert list(s.novel_names) == [n for n in order if n in OFFICIAL_NOVEL_17]
    by_name = {c["name"]: c["id"] for c in cats}
    assert list(s.base_ids) == [by_name[n] for n in s.base_names]
    assert list(s.novel_ids) == [by_name[n] for n in s.novel_names]


def test_coco_split_on_other_category_names_lists_the_missing():
    cats = [c if c["name"] != "couch" else {**c, "name": "sofa"} for c in coco80()]
    cats = [c for c in cats if c["name"] != "person"]
    with pytest.raises(OvdError, match=r"coco_ovd_48_17.*2 class name.*my_gt\.json") as e:
        resolve_split("coco_ovd_48_17", cats, source="my_gt.json")
    assert "couch" in str(e.value) and "person" in str(e.value)


def lvis_cats() -> list[dict]:
    return [{"id": i, "name": n, "frequency": f} for i, n, f in LVIS_CATS]


def test_lvis_rare_from_frequencies():
    s = resolve_split("lvis_rare", lvis_cats())
    assert s.name == "lvis_rare"
    assert s.novel_ids == tuple(i for i, _, f in LVIS_CATS if f == "r") == (1, 5, 13)
    assert s.base_ids == tuple(i for i, _, f in LVIS_CATS if f in ("c", "f")) == (2, 4, 9, 10)
    assert s.novel_names == ("aardvark", "acorn", "alcohol")


def test_lvis_rare_needs_frequencies():
    cats = lvis_cats()
    del cats[3]["frequency"]
    cats[5]["frequency"] = "rare"
    with pytest.raises(OvdError, match=r"lvis_rare.*coco\.json.*acorn.*alarm"):
        resolve_split("lvis_rare", cats, source="coco.json")


# --- split files -----------------------------------------------------------------------------------
CATS = [
    {"id": 4, "name": "cat"},
    {"id": 9, "name": "dog"},
    {"id": 2, "name": "hot dog"},
    {"id": 30, "name": "cup"},
]


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_split_file(tmp_path, suffix):
    path = tmp_path / f"my_split{suffix}"
    content = {"base": ["dog", "cat"], "novel": ["cup"]}
    if suffix == ".json":
        dump(path, content)
    else:
        path.write_text("# my split\nbase:\n  - dog\n  - cat\nnovel: [cup]\n")
    s = resolve_split(str(path), CATS)
    assert s.name == "my_split"
    assert s.base_names == ("cat", "dog") and s.base_ids == (4, 9)  # dataset order
    assert s.novel_names == ("cup",) and s.novel_ids == (30,)
    assert s.all_ids == (4, 9, 30)  # "hot dog" is in neither group


def test_split_file_names_with_spaces(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: [hot dog]\nnovel: ['dog']\n")
    s = resolve_split(str(path), CATS)
    assert s.base_ids == (2,) and s.novel_ids == (9,)


def test_split_file_unknown_names_are_all_listed(tmp_path):
    path = dump(tmp_path / "s.json", {"base": ["cat", "kitten"], "novel": ["cup", "mug", "Dog"]})
    with pytest.raises(OvdError) as e:
        resolve_split(str(path), CATS, source="gt.json")
    msg = str(e.value)
    assert "3 class name(s)" in msg and "gt.json" in msg
    for name in ("kitten", "mug", "Dog"):  # matching is exact, case included
        assert name in msg
    assert "cup" not in msg.split(":")[-1]


ERRORS = {
    "duplicate": ({"base": ["cat", "dog", "cat"], "novel": ["cup"]}, r"duplicate class name.*'base'.*cat"),
    "in_both": ({"base": ["cat", "dog"], "novel": ["dog", "cup"]}, r"both 'base' and 'novel'.*dog"),
    "missing_novel": ({"base": ["cat"]}, r"exactly the fields 'base' and 'novel'"),
    "extra_field": ({"base": ["cat"], "novel": ["dog"], "neither": ["cup"]}, r"exactly the fields"),
    "top_level_list": (["cat", "dog"], r"exactly the fields"),
    "base_not_list": ({"base": "cat", "novel": ["dog"]}, r"'base' must be a list"),
    "non_string_name": ({"base": ["cat", 3], "novel": ["dog"]}, r"'base' must be a list of non-empty"),
    "empty_name": ({"base": ["cat"], "novel": ["  "]}, r"'novel' must be a list of non-empty"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_split_file_errors(tmp_path, case, suffix):
    data, pattern = ERRORS[case]
    path = tmp_path / f"bad_split{suffix}"
    path.write_text(json.dumps(data))  # JSON is valid YAML
    with pytest.raises(OvdError, match=pattern) as e:
        resolve_split(str(path), CATS)
    assert "bad_split" in str(e.value)


def test_missing_split_file(tmp_path):
    with pytest.raises(OvdError, match=r"split file not found.*nope\.yaml.*coco_ovd_48_17"):
        resolve_split(str(tmp_path / "nope.yaml"), CATS)


@pytest.mark.parametrize("spec", ["coco_ovd_65", "lvis-rare", "COCO_OVD_48_17"])
def test_unknown_split_name(spec):
    with pytest.raises(OvdError, match=rf"unknown split '{spec}'.*coco_ovd_48_17.*lvis_rare"):
        resolve_split(spec, CATS)


def test_malformed_json_split_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"base": ["cat",')
    with pytest.raises(OvdError, match=r"s\.json is not valid JSON"):
        resolve_split(str(path), CATS)


def test_malformed_yaml_split_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: [cat\nnovel: [dog]\n")
    with pytest.raises(OvdError, match=r"s\.yaml is not valid YAML"):
        resolve_split(str(path), CATS)


def test_malformed_yaml_split_file_error_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: [cat\nnovel: [dog]\n")
    with pytest.raises(OvdError) as e:
        resolve_split(str(path), CATS)
    assert "\n" not in str(e.value)


def test_duplicate_key_in_yaml_split_file(tmp_path):
    # plain yaml.safe_load keeps the last 'novel' silently: the split must refuse it, naming file and key
    path = tmp_path / "s.yaml"
    path.write_text("base: [cat]\nnovel: [dog]\nnovel: [cow]\n")
    with pytest.raises(OvdError) as e:
        resolve_split(str(path), CATS)
    msg = str(e.value)
    assert str(path) in msg and "'novel' is given twice (lines 2 and 3)" in msg and "\n" not in msg
